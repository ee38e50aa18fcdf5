"""SCR's two passes in the engine core: a hidden diagnostic copy of the request runs first.

Patches on vLLM's ``Scheduler`` (engine-core process), installed once by :func:`install`:

* ``add_request``: an SCR request (not a no-op) is held back and a *diagnostic* copy is queued in its
  place: same prompt and images, one output token, id ``<id>+hg-diag``, the real id in
  ``extra_args[SCR_PARENT_KEY]`` (the worker files its selection under it, :mod:`.scr`).
* ``update_from_output``: once the diagnostic has finished, the real request is queued. The front end
  ignores the diagnostic's output (its id is unknown there), so the client sees one request.
* ``finish_requests``: aborting a held request aborts its diagnostic.
* ``_try_schedule_encoder_inputs``: an SCR request's image (diagnostic and real) is never split
  across prefill chunks (the edit mixes each source with its neighbours, so all image rows must be in
  one forward): a chunk that would cut it stops before it, and a request whose next token is the
  image's first waits (0 tokens this step) until a step has room for the whole image
  (:func:`whole_image_tokens`). vLLM's ``disable_chunked_mm_input`` is not enough: it only rolls back
  a chunk that starts *before* the image.
* ``schedule``: a request that waited for room is moved to the front of the running queue, so the
  next step gives it the whole token budget (admission checked that the image fits in it); other
  requests wait one step, none is preempted. After scheduling, an SCR request whose image was cut
  anyway is failed (:data:`FAILED_KEY`), never answered as if edited.
* ``update_from_output``: a real request whose diagnostic did not finish normally is failed too.

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
#: Scheduler attributes: requests to fail with an error at the next ``update_from_output``, and
#: scheduler-side counters (``scr_chunk_rollbacks``, ``scr_image_holds``, ``scr_failed``).
FAILED_KEY = "_halluguard_failed"
STATS_KEY = "_halluguard_stats"
#: Request (and scheduler) attribute: the request (some request) waited for room for its whole image
#: in the last step.
WAITING_KEY = "_halluguard_image_wait"


def whole_image_tokens(computed: int, num_new: int, span: tuple[int, int]) -> int:
    """How many of the ``num_new`` tokens from ``computed`` to schedule so that the step holds the image
    tokens ``span = [start, end)`` whole or not at all.

    A chunk before, after or around the image is kept; one that would cut it stops at the image's first
    token; one that starts at the image's first token and cannot reach its last schedules nothing (the
    request waits for a step with room). An image already partly computed cannot be helped (the
    caller's check fails such a request); the chunk is then kept.
    """
    start, end = span
    stop = computed + num_new
    if stop <= start or computed >= end or (computed <= start and stop >= end):
        return num_new
    if computed < start:
        return start - computed
    return 0 if computed == start else num_new


def image_span(request: Any) -> tuple[int, int] | None:
    """``[start, end)`` of an SCR request's (diagnostic or real) one image; ``None`` for others."""
    if scr_phase(request) is None or not request.mm_features:
        return None
    position = request.mm_features[0].mm_position
    return position.offset, position.offset + position.length


def cuts_image(first: int, num_tokens: int, span: tuple[int, int]) -> bool:
    """Whether computing tokens ``[first, first + num_tokens)`` in one step cuts the image ``span``
    (overlaps it without covering it)."""
    start, end = span
    stop = first + num_tokens
    return first < end and stop > start and not (first <= start and stop >= end)


def _count(scheduler: Any, key: str) -> None:
    stats = scheduler.__dict__.setdefault(STATS_KEY, {})
    stats[key] = stats.get(key, 0) + 1


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


def _fail(scheduler: Any, requests: list[Any], outputs: dict[int, Any]) -> None:
    """Finish ``requests`` (known to the scheduler) with an error and send that to their clients."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import RequestStatus

    ids = [r.request_id for r in requests]
    for request in scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR):
        if scr_phase(request) is not None:  # requests failed for another reason count elsewhere
            _count(scheduler, "scr_failed")
        out = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason=request.get_finished_reason(),
            events=request.take_events(),
            trace_headers=request.trace_headers,
        )
        if request.client_index in outputs:
            outputs[request.client_index].outputs.append(out)
        else:
            outputs[request.client_index] = EngineCoreOutputs(outputs=[out])


#: How a diagnostic that ran may finish (one token: length-capped, or stopped on its stop token).
DIAG_DONE = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


@functools.cache
def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    add_request = Scheduler.add_request
    schedule = Scheduler.schedule
    update_from_output = Scheduler.update_from_output
    finish_requests = Scheduler.finish_requests
    schedule_encoder = Scheduler._try_schedule_encoder_inputs
    diag_done = {RequestStatus[name] for name in DIAG_DONE}

    @functools.wraps(add_request)
    def _add_request(self: Any, request: Any) -> None:
        if request.request_id in self.requests or scr_phase(request) != "real":
            return add_request(self, request)
        request.skip_reading_prefix_cache = True
        diag = diagnostic_copy(request)
        _held(self)[diag.request_id] = (diag, request)
        return add_request(self, diag)

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.pop(WAITING_KEY, False):  # some request waited: its whole image goes first now
            waited = [r for r in self.running if r.__dict__.pop(WAITING_KEY, False)]
            self.running = waited + [r for r in self.running if r not in waited]
        output = schedule(self, *args, **kwargs)
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            span = image_span(request) if request is not None else None
            # num_computed_tokens already counts this step's tokens (vLLM's _update_after_schedule)
            if span is not None and cuts_image(request.num_computed_tokens - n, n, span):
                logger.error("halluguard: scr request %s had its image cut across chunks; failing it", req_id)
                self.__dict__.setdefault(FAILED_KEY, set()).add(req_id)
        return output

    @functools.wraps(update_from_output)
    def _update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = update_from_output(self, scheduler_output, model_runner_output)
        failed = []
        held = _held(self)
        for req_id in self.__dict__.pop(FAILED_KEY, ()):
            if req_id in held:  # a diagnostic: abort it and fail its held real request instead
                _, real = held.pop(req_id)
                finish_requests(self, req_id, RequestStatus.FINISHED_ABORTED)
                add_request(self, real)
                failed.append(real)
            elif (request := self.requests.get(req_id)) is not None:
                failed.append(request)
        for diag_id, (diag, real) in list(held.items()):
            if not diag.is_finished():
                continue
            del held[diag_id]
            if diag.status == RequestStatus.FINISHED_ABORTED:
                continue
            add_request(self, real)
            if diag.status not in diag_done:
                logger.error(
                    "halluguard: scr diagnostic %s ended %s; failing its request", diag_id, diag.status
                )
                failed.append(real)
        if failed:
            _fail(self, failed, outputs)
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
    def _try_schedule_encoder_inputs(
        self: Any,
        request: Any,
        num_computed_tokens: int,
        num_new_tokens: int,
        budget: int,
        *a: Any,
        **kw: Any,
    ) -> Any:
        span = image_span(request)
        if span is not None:
            n = whole_image_tokens(num_computed_tokens, num_new_tokens, span)
            if n < num_new_tokens:
                _count(self, "scr_chunk_rollbacks")
            if n == 0:  # the image's turn, but not enough room: wait, first in line next step
                _count(self, "scr_image_holds")
                request.__dict__[WAITING_KEY] = self.__dict__[WAITING_KEY] = True
                return [], 0, budget, [], []
            num_new_tokens = n
        return schedule_encoder(self, request, num_computed_tokens, num_new_tokens, budget, *a, **kw)

    Scheduler.add_request = _add_request
    Scheduler.schedule = _schedule
    Scheduler.update_from_output = _update_from_output
    Scheduler.finish_requests = _finish_requests
    Scheduler._try_schedule_encoder_inputs = _try_schedule_encoder_inputs
