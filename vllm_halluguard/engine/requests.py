"""Per-request method selection: the ``extra_args`` key, validation and resolution for a model.

A request selects a method with ``SamplingParams(extra_args={"halluguard": spec})`` where ``spec`` is
what :func:`vllm_halluguard.methods.parse` accepts (``"kvsmooth"``, ``{"method": "farsight", ...}``).
The same :func:`resolve` runs at admission (API/LLM process: invalid specs are rejected there, for
that request only) and in the worker (to build the request's state), so both see one config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_halluguard.methods import FarSightConfig, MethodConfig, ModelFamily, parse

EXTRA_ARGS_KEY = "halluguard"
#: On SCR's hidden diagnostic copy of a request (engine/two_pass.py): the id of the real request.
SCR_PARENT_KEY = "halluguard_scr_parent"
#: Methods the engine runs today; the others exist in the dense reference only.
ENGINE_METHODS = frozenset({"kvsmooth", "farsight", "prunehal", "scr"})
#: Methods that act on image tokens: a request without an image is refused.
IMAGE_METHODS = frozenset({"prunehal", "scr"})
#: Longest KVSmooth entropy FIFO the engine keeps per request and layer.
MAX_KVSMOOTH_WINDOW = 64

_FAMILIES: dict[str, ModelFamily] = {"llava": "llava", "qwen2_vl": "qwen2_vl"}


def model_family(hf_config: Any) -> ModelFamily | None:
    """The method-preset family of a HF config (``None`` for models without presets)."""
    return _FAMILIES.get(getattr(hf_config, "model_type", ""))


def spec_of(extra_args: Mapping[str, Any] | None) -> Any:
    """The request's method spec (``None`` if absent).

    A string that starts with ``{`` is decoded as JSON: the OpenAI server's ``vllm_xargs`` only carries
    flat values, so the server sends an object spec as its JSON text. Text that is not valid JSON is
    returned as is, and :func:`resolve` rejects it as an unknown method.
    """
    spec = None if not extra_args else extra_args.get(EXTRA_ARGS_KEY)
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            return json.loads(spec)
        except json.JSONDecodeError:
            return spec
    return spec


def resolve(spec: Any, hf_config: Any, kv_cache_dtype: str = "auto") -> MethodConfig | None:
    """Validate ``spec`` for this model and fill its presets; ``None`` = plain request.

    Raises ``ValueError`` with a message naming the problem.
    """
    cfg = parse(spec)
    if cfg is None:
        return None
    if cfg.name not in ENGINE_METHODS:
        raise ValueError(
            f"method {cfg.name!r} is not available in the engine yet (engine methods: "
            f"{', '.join(sorted(ENGINE_METHODS))}); it runs in the HF reference (vllm_halluguard.reference)"
        )
    if isinstance(cfg, FarSightConfig):
        explicit_mode = isinstance(spec, Mapping | FarSightConfig) and (
            "mode" in spec if isinstance(spec, Mapping) else "mode" in spec.model_fields_set
        )
        if not explicit_mode:
            cfg = cfg.model_copy(update={"mode": "C"})  # closest to mode A (docs/methods.md)
        if cfg.mode == "A":
            raise ValueError(
                "farsight mode 'A' recomputes the whole sequence at every step and exists in the HF "
                "reference only; the engine runs mode 'C' (prompt rows, default) or 'B' (per-head sink)"
            )
    family = model_family(hf_config)
    if family is None:
        raise ValueError(
            f"mitigation methods have presets for LLaVA-1.5 and Qwen2-VL only, not for model type "
            f"{getattr(hf_config, 'model_type', None)!r}"
        )
    if kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"mitigation methods need an unquantized KV cache, not {kv_cache_dtype!r}")
    num_layers = hf_config.get_text_config().num_hidden_layers
    cfg = cfg.for_model(family, num_layers)
    if getattr(cfg, "window", 0) > MAX_KVSMOOTH_WINDOW:
        raise ValueError(f"kvsmooth.window: the engine keeps at most {MAX_KVSMOOTH_WINDOW} entries")
    return cfg


def check_inputs(
    cfg: MethodConfig, features: Sequence[Any] | None, prompt_len: int, vllm_config: Any
) -> None:
    """Refuse a request whose prompt or engine settings the method cannot work with (``ValueError``).

    ``features``: the request's multimodal features (``mm_position`` = placeholder range). Image methods
    need an image. SCR also needs exactly one image with text after it (the diagnostic's query rows), the
    image inside one prefill chunk, no pipeline parallelism (the diagnostic and the edit layers must live
    in one worker) and eager execution (the edit is a forward hook on the decoder layers).
    """
    images = [f for f in features or () if getattr(f, "modality", "image") == "image"]
    if cfg.name in IMAGE_METHODS and not images:
        raise ValueError(f"method {cfg.name!r} acts on image tokens and needs an image in the prompt")
    if cfg.name != "scr" or cfg.is_noop():
        return
    if len(images) != 1:
        raise ValueError(f"scr supports one image per request, got {len(images)}")
    span = images[0].mm_position
    if span.offset + span.length >= prompt_len:
        raise ValueError("scr needs text after the image (the diagnostic pass reads its attention)")
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    if span.length > budget:
        raise ValueError(
            f"scr keeps an image inside one prefill chunk, but the image has {span.length} tokens and "
            f"max_num_batched_tokens is {budget}"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("scr does not support pipeline parallelism")
    if int(vllm_config.compilation_config.mode) != 0:
        raise ValueError(
            "scr edits the residual stream with forward hooks and needs eager execution (--enforce-eager)"
        )
