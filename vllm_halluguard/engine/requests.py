"""Admission in the engine: a request's spec resolved for the served model, and its inputs checked.

The spec contract itself lives in :mod:`vllm_halluguard.methods.resolve` (the server calls the same
function); the per-method input rules in each engine method's ``check_inputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY, SCR_PARENT_KEY, spec_of
from vllm_halluguard.engine.registry import ENGINE_METHODS, IMAGE_METHODS, method_of
from vllm_halluguard.methods import MethodConfig, SpecError
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW, model_family, resolve

__all__ = [
    "ENGINE_METHODS",
    "EXTRA_ARGS_KEY",
    "IMAGE_METHODS",
    "MAX_KVSMOOTH_WINDOW",
    "SCR_PARENT_KEY",
    "check_inputs",
    "check_parallel",
    "model_family",
    "resolve",
    "spec_of",
]


def check_parallel(cfg: MethodConfig, vllm_config: Any) -> None:
    """Refuse a method the engine's tensor/pipeline/context parallel layout cannot serve (:class:`SpecError`,
    reason ``unsupported``). Admission calls it per request, the server at startup for its default."""
    method = method_of(cfg)
    parallel = vllm_config.parallel_config
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    if tp > 1 and not method.tensor_parallel:
        raise SpecError(
            f"{cfg.name} is not supported with tensor parallelism (tensor_parallel_size={tp}); "
            "serve it with tensor_parallel_size=1",
            "unsupported",
        )
    cp = {k: getattr(parallel, f"{k}_context_parallel_size", 1) for k in ("decode", "prefill")}
    if any(n > 1 for n in cp.values()):
        sizes = ", ".join(f"{k}_context_parallel_size={n}" for k, n in cp.items())
        raise SpecError(
            f"{cfg.name} is not supported with context parallelism ({sizes}): the methods read every key "
            "of a row from one worker's cache, which context parallelism splits across ranks",
            "unsupported",
        )
    if pp > 1 and not method.pipeline_parallel:
        raise SpecError(
            f"{cfg.name} is not supported with pipeline parallelism (pipeline_parallel_size={pp}): "
            f"{method.pipeline_reason}; serve it with pipeline_parallel_size=1",
            "unsupported",
        )


def check_inputs(
    cfg: MethodConfig, features: Sequence[Any] | None, prompt_len: int, vllm_config: Any
) -> None:
    """Refuse a request whose prompt or engine settings the method cannot work with (:class:`SpecError`,
    reason ``inputs``). ``features``: the request's multimodal features (``mm_position`` = placeholder
    range)."""
    method = method_of(cfg)
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise SpecError(
            "mitigation methods do not run with speculative decoding (decode rows carry draft tokens)",
            "unsupported",
        )
    check_parallel(cfg, vllm_config)
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
