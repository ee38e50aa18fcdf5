"""Admission in the engine: a request's spec resolved for the served model, and its inputs checked.

The spec contract itself lives in :mod:`vllm_halluguard.methods.resolve` (the server calls the same
function); the per-method input rules in each engine method's ``check_inputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY, SCR_PARENT_KEY, spec_of
from vllm_halluguard.engine.registry import ENGINE_METHODS, IMAGE_METHODS, METHODS
from vllm_halluguard.methods import Config, SpecError, members_of
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW, model_family, resolve

__all__ = [
    "ENGINE_METHODS",
    "EXTRA_ARGS_KEY",
    "IMAGE_METHODS",
    "MAX_KVSMOOTH_WINDOW",
    "SCR_PARENT_KEY",
    "check_inputs",
    "check_parallel",
    "check_settings",
    "model_family",
    "resolve",
    "spec_of",
]


def check_parallel(cfg: Config, vllm_config: Any) -> None:
    """Refuse a method (each member of a composition) that the engine's parallel layout cannot serve
    (:class:`SpecError`, reason ``unsupported``): tensor parallel for a method without TP-consistent
    decisions, settings that split a step's rows or a request's KV cache (:func:`split_steps`), pipeline
    parallel, a KV connector (:func:`kv_connector`). Admission calls it per request, the server at
    startup for its default."""
    parallel = vllm_config.parallel_config
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    split = split_steps(vllm_config)
    connector = kv_connector(vllm_config)
    if connector is not None:
        raise SpecError(
            f"mitigation methods do not run with a KV connector ({connector}): vLLM hands the connector "
            "each layer's attention metadata, which on a mitigated step is the plugin's plan, and the "
            "KV it moves or reloads would leave the method's per-request state behind; serve mitigated "
            "requests without --kv-transfer-config / --kv-offloading-size",
            "unsupported",
        )
    for member in members_of(cfg):
        method = METHODS[member.name]
        if tp > 1 and not method.tensor_parallel:
            raise SpecError(
                f"{member.name} is not supported with tensor parallelism (tensor_parallel_size={tp}); "
                "serve it with tensor_parallel_size=1",
                "unsupported",
            )
        if split is not None:
            raise SpecError(f"{member.name} does not run with {split}", "unsupported")
        if pp > 1 and not method.pipeline_parallel:
            raise SpecError(
                f"{member.name} is not supported with pipeline parallelism (pipeline_parallel_size={pp}): "
                f"{method.pipeline_reason}; serve it with pipeline_parallel_size=1",
                "unsupported",
            )


def check_settings(cfg: Config, vllm_config: Any) -> None:
    """Refuse a config that the engine's settings alone rule out, whatever the request
    (:class:`SpecError`, reason ``unsupported``): speculative decoding, the parallel layout
    (:func:`check_parallel`), each member's own ``EngineMethod.check_settings``. Admission calls it
    per request; ``GET /v1/mitigations`` uses it to say what this server serves."""
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise SpecError(
            "mitigation methods do not run with speculative decoding (decode rows carry draft tokens)",
            "unsupported",
        )
    check_parallel(cfg, vllm_config)
    for member in members_of(cfg):
        try:
            METHODS[member.name].check_settings(member, vllm_config)
        except ValueError as e:
            raise SpecError(str(e), "unsupported") from e


def check_inputs(cfg: Config, features: Sequence[Any] | None, prompt_len: int, vllm_config: Any) -> None:
    """Refuse a request whose engine settings (:func:`check_settings`) or prompt the method cannot work
    with (:class:`SpecError`, reason ``unsupported`` or ``inputs``); a composition is refused if one of
    its members is. ``features``: the request's multimodal features (``mm_position`` = placeholder range)."""
    check_settings(cfg, vllm_config)
    for member in members_of(cfg):
        _check_one(member, features, prompt_len, vllm_config)


def _check_one(cfg: Any, features: Sequence[Any] | None, prompt_len: int, vllm_config: Any) -> None:
    method = METHODS[cfg.name]
    images = [f for f in features or () if getattr(f, "modality", "image") == "image"]
    if method.needs_image and not images:
        raise SpecError(
            f"method {cfg.name!r} acts on image tokens and needs an image in the prompt", "inputs"
        )
    try:
        method.check_inputs(cfg, images, prompt_len, vllm_config)
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(str(e), "inputs") from e


def split_steps(vllm_config: Any) -> str | None:
    """The engine setting, if any, that splits a step's rows or a request's KV cache in a way the
    runtime's per-step view does not follow (on both model runners), described for the refusal."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "use_ubatching", False):
        return "micro-batching (--enable-dbo / --ubatch-size): attention metadata is built per micro-batch"
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallelism: a prefill's tokens are split across ranks"
    if getattr(parallel, "decode_context_parallel_size", 1) > 1:
        return "decode context parallelism: a request's KV cache is split across ranks"
    return None


def kv_connector(vllm_config: Any) -> str | None:
    """The KV connector vLLM runs (P/D disaggregation, LMCache, KV offloading), if any.

    vLLM's ``maybe_transfer_kv_layer`` (``model_executor/layers/attention/kv_transfer_utils.py``) calls
    the connector's ``save_kv_layer`` with the layer's ``attn_metadata`` from the forward context: on a
    mitigated step that is the plugin's ``StepPlan``, which no connector knows. Mitigated requests are
    refused instead (plain requests are served as usual)."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return getattr(transfer, "kv_connector", None) if transfer is not None else None
