"""SCR's two passes in the engine core: a hidden diagnostic copy of the request runs first.

Patches on vLLM's ``Scheduler`` (engine-core process), installed once by :func:`install`:

* ``add_request``: an SCR request (not a no-op) is held back and a *diagnostic* copy is queued in its
  place: same prompt and images, one output token, id ``<id>+hg-diag``, the real id in
  ``extra_args[SCR_PARENT_KEY]`` (the worker files its selection under it, :mod:`.scr`).
* ``update_from_output``: once the diagnostic has finished, the real request is queued. The front end
  ignores the diagnostic's output (its id is unknown there), so the client sees one request.
* ``finish_requests``: aborting a held request aborts its diagnostic.
* ``_try_schedule_encoder_inputs``: the real request's image is never split across prefill chunks
  (the edit mixes each source with its neighbours, so all image rows must be in one forward).

Both passes skip *reading* the prefix cache (the diagnostic must compute every row it measures; the real
request's image rows must be computed to be edited) and have their own cache salt
(:func:`vllm_halluguard.engine.hooks.method_salt`), so no other request reads their blocks either.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY, SCR_PARENT_KEY, config_of

logger = logging.getLogger(__name__)

DIAG_SUFFIX = "+hg-diag"


def scr_phase(request: Any) -> str | None:
    """``"diag"``, ``"real"`` (an SCR request that edits) or ``None``, memoised on the request."""
    cached = request.__dict__.get("_halluguard_scr", False)
    if cached is not False:
        return cached
    from vllm_halluguard.methods import SCRConfig

    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    phase = None
    if EXTRA_ARGS_KEY in extra:
        cfg = scr_config(config_of(request))
        if isinstance(cfg, SCRConfig) and not cfg.is_noop():
            phase = "diag" if SCR_PARENT_KEY in extra else "real"
    request.__dict__["_halluguard_scr"] = phase
    return phase


def scr_config(cfg: Any) -> Any:
    """The SCR config of a request's config (itself, or a composition's SCR member), else ``None``."""
    from vllm_halluguard.methods import SCRConfig, members_of

    return next((m for m in members_of(cfg) if isinstance(m, SCRConfig)), None) if cfg is not None else None


def diagnostic_copy(real: Any) -> Any:
    """The hidden diagnostic request of ``real``: its prompt and images, one token, no prefix-cache reads.

    The diagnostic runs SCR alone, also for a composition (its other members do not act in SCR's
    diagnostic pass; docs/methods.md, "Composing methods")."""
    from vllm.v1.request import Request

    params = real.sampling_params.clone()
    params.max_tokens, params.min_tokens = 1, 0
    params.logprobs = params.prompt_logprobs = None
    params.structured_outputs = None
    params.skip_reading_prefix_cache = True
    scr = scr_config(config_of(real))
    params.extra_args = {
        **(params.extra_args or {}),
        EXTRA_ARGS_KEY: scr.canonical(),
        SCR_PARENT_KEY: real.request_id,
    }
    return Request(
        request_id=real.request_id + DIAG_SUFFIX,
        prompt_token_ids=real.prompt_token_ids,
        sampling_params=params,
        pooling_params=None,
        client_index=real.client_index,
        arrival_time=real.arrival_time,
        mm_features=real.mm_features,
        lora_request=real.lora_request,
        cache_salt=real.cache_salt,
        priority=real.priority,
        block_hasher=real._block_hasher,
    )


def _held(scheduler: Any) -> dict[str, tuple[Any, Any]]:
    """Diagnostic id -> (diagnostic, real request held back), per scheduler."""
    return scheduler.__dict__.setdefault("_halluguard_held", {})


@functools.cache
def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    add_request = Scheduler.add_request
    update_from_output = Scheduler.update_from_output
    finish_requests = Scheduler.finish_requests
    schedule_encoder = Scheduler._try_schedule_encoder_inputs

    @functools.wraps(add_request)
    def _add_request(self: Any, request: Any) -> None:
        if request.request_id in self.requests or scr_phase(request) != "real":
            return add_request(self, request)
        request.skip_reading_prefix_cache = True
        diag = diagnostic_copy(request)
        _held(self)[diag.request_id] = (diag, request)
        return add_request(self, diag)

    @functools.wraps(update_from_output)
    def _update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = update_from_output(self, scheduler_output, model_runner_output)
        held = self.__dict__.get("_halluguard_held")
        for diag_id, (diag, real) in list((held or {}).items()):
            if not diag.is_finished():
                continue
            del held[diag_id]
            if diag.status == RequestStatus.FINISHED_ABORTED:
                continue
            add_request(self, real)
        return outputs

    @functools.wraps(finish_requests)
    def _finish_requests(self: Any, request_ids: Any, finished_status: Any) -> Any:
        held = self.__dict__.get("_halluguard_held")
        if held:
            ids = (
                None
                if request_ids is None
                else {request_ids}
                if isinstance(request_ids, str)
                else set(request_ids)
            )
            for diag_id, (_, real) in list(held.items()):
                if ids is None or real.request_id in ids:
                    del held[diag_id]
                    if ids is not None:
                        ids.add(diag_id)
            request_ids = ids
        return finish_requests(self, request_ids, finished_status)

    @functools.wraps(schedule_encoder)
    def _try_schedule_encoder_inputs(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        config = self.scheduler_config
        if config.disable_chunked_mm_input or scr_phase(request) != "real":
            return schedule_encoder(self, request, *args, **kwargs)
        config.disable_chunked_mm_input = True
        try:
            result = schedule_encoder(self, request, *args, **kwargs)
        finally:
            config.disable_chunked_mm_input = False
        asked = kwargs["num_new_tokens"] if "num_new_tokens" in kwargs else args[1]
        if result[1] < asked:  # the chunk stops before the image; the image goes whole in a later step
            stats = self.__dict__.setdefault("_halluguard_stats", {})
            stats["scr_chunk_rollbacks"] = stats.get("scr_chunk_rollbacks", 0) + 1
        return result

    Scheduler.add_request = _add_request
    Scheduler.update_from_output = _update_from_output
    Scheduler.finish_requests = _finish_requests
    Scheduler._try_schedule_encoder_inputs = _try_schedule_encoder_inputs
