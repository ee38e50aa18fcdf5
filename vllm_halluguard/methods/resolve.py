"""The request contract: a user's spec, resolved for one served model, or a typed error.

:func:`resolve` is the one place where a spec (what users write: ``"kvsmooth"``,
``{"method": "farsight", "mode": "C"}``) becomes the canonical config the engine runs. The server
(to answer a 400 before anything runs) and the engine (at admission) both call it, so a request the
server accepts is one the engine accepts. Errors are :class:`SpecError` with a machine-readable
``reason`` (metrics use the reason, never the message).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import parse
from .base import MethodConfig, ModelFamily
from .compose import Composition, Config
from .errors import SpecError
from .farsight import FarSightConfig

#: Model types with presets, by method-preset family.
FAMILIES: dict[str, ModelFamily] = {
    "llava": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
}
#: (method, family) pairs the engine refuses, with why (docs/methods.md, "Architectures").
NOT_APPLICABLE: dict[tuple[str, ModelFamily], str] = {
    ("scr", "llava_next"): (
        "scr defines its neighbourhoods on one patch grid; a LLaVA-NeXT image is a base-image grid plus "
        "a grid of tiles with a newline token after each row, and scr is not defined across them"
    ),
    ("scr", "llava_onevision"): (
        "scr defines its neighbourhoods on one patch grid; a LLaVA-OneVision image is a base-image grid "
        "plus a grid of tiles with a newline token after each row, and scr is not defined across them"
    ),
}
#: KV-cache dtypes the methods read and write (quantized caches are refused).
KV_CACHE_DTYPES = frozenset({"auto", "float32", "bfloat16", "float16"})
#: Longest KVSmooth entropy FIFO the engine keeps per request and layer.
MAX_KVSMOOTH_WINDOW = 64
#: FarSight's served mode when a request names none: mode C, the closest to the paper's mode A
#: (docs/methods.md; mode A exists in the HF reference only).
SERVED_FARSIGHT_MODE = "C"


def model_family(hf_config: Any) -> ModelFamily | None:
    """The method-preset family of a HF config (``None`` for models without presets)."""
    return FAMILIES.get(getattr(hf_config, "model_type", ""))


def resolve(
    spec: Any, hf_config: Any, kv_cache_dtype: str = "auto", family: ModelFamily | None = None
) -> Config | None:
    """Validate ``spec`` for this model and fill its presets; ``None`` = a plain request.

    ``spec`` may be what :func:`parse` returned (it is not parsed again). ``family`` overrides the
    model's preset family (the server's ``--mitigation-preset``); the depth is the model's own.
    A composition (a list spec) is resolved member by member, each as if it came alone.
    Raises :class:`SpecError` naming the problem (reasons: those of :func:`parse`, and
    ``unsupported`` for settings the engine does not serve or methods that do not apply to the
    model's architecture (:data:`NOT_APPLICABLE`), ``model`` for a model without presets,
    ``kv_cache`` for a quantized KV cache).
    """
    cfg = parse(spec)
    if cfg is None:
        return None
    family = family or model_family(hf_config)
    if isinstance(cfg, Composition):
        return Composition(
            tuple(_resolve_one(m, True, hf_config, family, kv_cache_dtype) for m in cfg.members)
        )
    return _resolve_one(cfg, _names_mode(spec), hf_config, family, kv_cache_dtype)


def _resolve_one(
    cfg: MethodConfig, names_mode: bool, hf_config: Any, family: ModelFamily | None, kv_cache_dtype: str
) -> MethodConfig:
    if isinstance(cfg, FarSightConfig):
        if not names_mode:
            cfg = cfg.model_copy(update={"mode": SERVED_FARSIGHT_MODE})
        if cfg.mode == "A":
            raise SpecError(
                "farsight mode 'A' recomputes the whole sequence at every step and exists in the HF "
                "reference only; the engine runs mode 'C' (prompt rows, default) or 'B' (per-head sink)",
                "unsupported",
            )
    if family is None:
        raise SpecError(
            f"mitigation methods have presets for model types {sorted(FAMILIES)} only, not for "
            f"{str(getattr(hf_config, 'model_type', None))[:64]!r}",
            "model",
        )
    refusal = NOT_APPLICABLE.get((cfg.name, family))
    if refusal is not None:
        raise SpecError(f"{refusal} (model type {hf_config.model_type!r})", "unsupported")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise SpecError(
            f"mitigation methods need an unquantized KV cache, not {kv_cache_dtype!r}", "kv_cache"
        )
    num_layers = hf_config.get_text_config().num_hidden_layers
    try:
        cfg = cfg.for_model(family, num_layers)
    except ValueError as e:
        raise SpecError(str(e), "invalid_params") from e
    if getattr(cfg, "window", 0) > MAX_KVSMOOTH_WINDOW:
        raise SpecError(
            f"kvsmooth.window: the engine keeps at most {MAX_KVSMOOTH_WINDOW} entries", "unsupported"
        )
    return cfg


def _names_mode(spec: Any) -> bool:
    if isinstance(spec, FarSightConfig):
        return "mode" in spec.model_fields_set
    return isinstance(spec, Mapping) and "mode" in spec
