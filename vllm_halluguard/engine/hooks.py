"""The few places where the plugin hooks into vLLM, each installed once per process.

* attention backends: ``CPU_ATTN``, ``FLASH_ATTN`` and ``TRITON_ATTN`` are replaced by the same
  backends wrapped (:mod:`.backends`): plain steps run natively and unchanged, mitigated rows are
  partitioned out (:func:`install_backends`); a model runner whose decoder layers got another backend
  fails at startup, naming the supported ones (:func:`install_backend_check`);
* CUDA graphs: a step with rows that need the plugin in attention is dispatched without full graphs,
  so the per-layer partition runs (:func:`install_cudagraph_guard`); other steps (plain ones, FarSight
  C decode, SCR's real request, PruneHal without image tokens) keep every graph and vLLM's metadata;
* model runner: once vLLM knows the step's rows, the runtime syncs its request table
  (:func:`vllm_halluguard.engine.runners.ensure_runner_hook`, installed lazily by our metadata
  builders, i.e. in workers only);
* admission: ``InputProcessor.process_inputs`` first resolves the request's method spec, so a bad
  spec fails that request with a clear error (:func:`install_admission`);
* runner choice: the plugin follows the model runner vLLM picks (V1, or V2, the GPU default in vLLM 0.32;
  :mod:`.runner_v2`) and never sets ``VLLM_USE_V2_MODEL_RUNNER``;
* prefix cache: a request's canonical method config (resolved for the model at admission) is mixed
  into its first block's hash, so requests with different methods never share KV blocks, and
  different spellings of one config do; blocks of generated tokens whose K/V a method rewrote
  (KVSmooth) hash per request (:func:`install_cache_salt`);
* scheduler: SCR requests run a hidden diagnostic copy first (:mod:`.two_pass`); a preempted request
  whose method carries decode-step state replays its generated tokens one per step (:mod:`.replay`);
  engine methods may hook the model itself (SCR wraps the decoder layers' forward, on its first
  request);
* KV blocks: PruneHal's reclaiming variant reports fully pruned prompt blocks on the model runner's
  output and the scheduler frees them (:mod:`.reclaim`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from typing import Any

from vllm_halluguard.engine.guards import (
    BACKENDS,
    invalid_cudagraph_modes,
    refuse_unsupported_backends,
    unsupported_backends,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "install_all",
    "invalid_cudagraph_modes",
    "refuse_unsupported_backends",
    "unsupported_backends",
]

#: Resolved specs remembered per API process (by their text; see ``install_admission``).
MEMO_SIZE = 256


def install_backends() -> None:
    """Register the wrapped backends over vLLM's names (the wrapped class is made on first use)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_halluguard.engine.plan import rework_engine

    rework_engine()  # a bad HALLUGUARD_ATTENTION fails here, at startup
    for name, attr in BACKENDS.items():
        register_backend(AttentionBackendEnum[name], f"vllm_halluguard.engine.backends.{attr}")


@functools.cache
def install_backend_check() -> None:
    """On both model runners (V1: ``initialize_attn_backend``; V2: :mod:`.runner_v2`)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_halluguard.engine import runner_v2

    original = GPUModelRunner.initialize_attn_backend

    @functools.wraps(original)
    def initialize_attn_backend(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        refuse_unsupported_backends(self.attn_groups)
        return result

    GPUModelRunner.initialize_attn_backend = initialize_attn_backend
    runner_v2.install_backend_check()


@functools.cache
def install_cudagraph_guard() -> None:
    """V1's ``CudagraphDispatcher``; V2's ``CudaGraphManager`` in :mod:`.runner_v2`."""
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from vllm_halluguard.engine import runner_v2
    from vllm_halluguard.engine.state import current

    original = CudagraphDispatcher.dispatch

    @functools.wraps(original)
    def dispatch(self: Any, num_tokens: int, *args: Any, invalid_modes: Any = None, **kwargs: Any) -> Any:
        runtime = current()
        extra = invalid_cudagraph_modes(runtime)
        valid = kwargs.get("valid_modes")
        if extra and valid and set(valid) <= extra:  # a mode forced from outside (data-parallel sync)
            logger.error("halluguard: a step whose mitigated rows need attention was forced to full "
                         "CUDA graphs; it runs unmitigated, on vLLM's own metadata")  # fmt: skip
            runtime.step = dataclasses.replace(runtime.step, needs_attention=False)
        elif extra:
            invalid_modes = set(invalid_modes or ()) | extra
        return original(self, num_tokens, *args, invalid_modes=invalid_modes, **kwargs)

    CudagraphDispatcher.dispatch = dispatch
    runner_v2.install_cudagraph_guard()


@functools.cache
def install_admission() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY, check_inputs, resolve, spec_of

    original = InputProcessor.process_inputs

    @functools.wraps(original)
    def process_inputs(
        self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
    ) -> Any:
        extra_args = getattr(params, "extra_args", None)
        internal = _internal_keys(extra_args)
        if internal:
            _reject(
                self,
                prompt,
                ValueError(
                    f"{internal[0][:64]!r} is an internal key; requests may set only {EXTRA_ARGS_KEY!r}"
                ),
            )
        spec = spec_of(extra_args)
        cfg = None
        if spec is not None:
            assert extra_args is not None  # spec_of found the key in it
            try:
                cfg = _resolve_once(self, extra_args[EXTRA_ARGS_KEY], spec)
            except ValueError as e:
                _reject(self, prompt, e)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if cfg is not None:
            try:
                check_inputs(cfg, request.mm_features, len(request.prompt_token_ids or ()), self.vllm_config)
            except ValueError as e:
                _reject(self, prompt, e)
            # From here on the request carries the resolved config: the same effective config has one
            # spelling (one prefix-cache salt), whatever the caller wrote. vLLM cloned the params, maybe
            # shallowly, so the dict is replaced rather than edited.
            sampling = request.sampling_params
            sampling.extra_args = {**(sampling.extra_args or {}), EXTRA_ARGS_KEY: cfg.canonical()}
        return request

    def _resolve_once(input_processor: Any, raw: Any, spec: Any) -> Any:
        """:func:`resolve`, memoised per process on the spec's text: the server sends each request's
        canonical config as JSON text, so one config is resolved once, whatever the traffic."""
        args = (input_processor.model_config.hf_config, input_processor.vllm_config.cache_config.cache_dtype)
        if not isinstance(raw, str):
            return resolve(spec, *args)
        memo = input_processor.__dict__.setdefault("_halluguard_resolved", OrderedDict())
        if raw not in memo:
            memo[raw] = resolve(spec, *args)  # a bad spec raises and is not remembered
            while len(memo) > MEMO_SIZE:
                memo.popitem(last=False)
        return memo[raw]

    def _reject(input_processor: Any, prompt: Any, error: ValueError) -> None:
        _forget_rendered_items(input_processor, prompt)
        msg = f"invalid {EXTRA_ARGS_KEY} method: {error}"
        raise VLLMValidationError(msg, parameter=EXTRA_ARGS_KEY) from error

    InputProcessor.process_inputs = process_inputs


def _internal_keys(extra_args: Any) -> list[str]:
    """Keys of a request's ``extra_args`` that only the plugin itself may set (``halluguard*`` but not
    ``halluguard``), e.g. the SCR diagnostic copy's parent link, which is added inside the scheduler."""
    if not isinstance(extra_args, dict):
        return []
    return [
        k
        for k in extra_args
        if isinstance(k, str) and k.lower().startswith("halluguard") and k != "halluguard"
    ]


def _forget_rendered_items(input_processor: Any, prompt: Any) -> None:
    """Drop a rejected request's images from the P0 multimodal cache.

    vLLM renders (and caches on the sending side) a prompt's images before it validates the request;
    a request rejected afterwards never reaches the engine core, so the next request with the same
    image would be sent as a bare cache hash that the engine core never received.
    """
    cache = getattr(getattr(input_processor, "renderer", None), "mm_processor_cache", None)
    if cache is None or not isinstance(prompt, dict):
        return
    decoder = prompt.get("decoder_prompt", prompt) if prompt.get("type") == "enc_dec" else prompt
    for hashes in (decoder.get("mm_hashes") or {}).values():
        for mm_hash in hashes:
            cache.invalidate(mm_hash)


def method_salt(request: Any) -> str | None:
    """Canonical method config of an engine-core request (``None`` for plain requests), memoised."""
    cached = request.__dict__.get("_halluguard_salt", False)
    if cached is not False:
        return cached
    from vllm_halluguard.engine.keys import config_of
    from vllm_halluguard.engine.two_pass import scr_phase

    cfg = config_of(request)
    salt = cfg.canonical() if cfg is not None else None
    if salt is not None and scr_phase(request) == "diag":
        salt += "/scr-diagnostic"
    request.__dict__["_halluguard_salt"] = salt
    return salt


def _edits_generated_kv(request: Any) -> bool:
    """Whether the request's method rewrites its generated tokens' cached K/V (KVSmooth): those blocks
    then hash per request, so a later prompt that contains the same tokens computes them raw."""
    from vllm_halluguard.engine.keys import config_of
    from vllm_halluguard.engine.registry import member_methods

    cfg = config_of(request)
    return cfg is not None and any(m.edits_generated_kv for m in member_methods(cfg))


@functools.cache
def install_cache_salt() -> None:
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils.generate_block_hash_extra_keys

    @functools.wraps(original)
    def generate_block_hash_extra_keys(
        request: Any, start_token_idx: int, end_token_idx: int, start_mm_idx: int
    ):
        keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
        if start_token_idx == 0:
            salt = method_salt(request)
            if salt is not None:
                keys = (*(keys or ()), ("halluguard", salt))
        if end_token_idx > request.num_prompt_tokens and _edits_generated_kv(request):
            keys = (*(keys or ()), ("halluguard-generated", request.request_id))
        return keys, next_mm

    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys


def install_all() -> None:
    from vllm_halluguard.engine import reclaim, replay, two_pass

    install_backends()
    install_backend_check()
    install_cudagraph_guard()
    install_admission()
    install_cache_salt()
    two_pass.install()
    replay.install()
    reclaim.install_scheduler()
