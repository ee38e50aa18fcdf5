"""Method configs and math: one module per method, one registry.

``parse`` turns what users write (``"kvsmooth"``, ``"none"``, ``{"method": "scr", "lam": 1.1}``) into a
config; ``METHODS`` maps names to config classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .base import MODEL_FAMILIES, REFERENCE_DEPTH, MethodConfig, ModelFamily, scale_layer_range
from .errors import SpecError
from .farsight import FarSightConfig
from .kvsmooth import KVSmoothConfig
from .prunehal import PruneHalConfig
from .scr import SCRConfig

METHODS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (KVSmoothConfig, PruneHalConfig, FarSightConfig, SCRConfig)
}

#: Names that mean "no mitigation".
NONE_NAMES = frozenset({"none", ""})


def parse(obj: Any) -> MethodConfig | None:
    """Parse a method spec; ``None`` for no method.

    Accepts ``None``, a :class:`MethodConfig`, a method name (``"kvsmooth"``, ``"none"``) or a mapping
    ``{"method": name, **params}``. Raises :class:`SpecError` (a ``ValueError``) naming the offending
    name or field otherwise.
    """
    if obj is None or isinstance(obj, MethodConfig):
        return obj
    if isinstance(obj, str):
        name, params = obj.strip().lower(), {}
    elif isinstance(obj, Mapping):
        if "method" not in obj:
            raise SpecError(f"method spec has no 'method' key; known methods: {_known()}", "invalid_spec")
        name = obj["method"]
        if not isinstance(name, str):
            raise SpecError(f"'method' must be a string, got {type(name).__name__}", "invalid_spec")
        name = name.strip().lower()
        params = {k: v for k, v in obj.items() if k != "method"}
    else:
        raise SpecError(f"cannot parse a method spec from {type(obj).__name__}", "invalid_spec")
    if name in NONE_NAMES:
        if params:
            raise SpecError(f"method 'none' takes no parameters, got {sorted(params)}", "invalid_params")
        return None
    cls = METHODS.get(name)
    if cls is None:
        raise SpecError(f"unknown method {name!r}; known methods: {_known()}", "unknown_method")
    try:
        return cls(**params)
    except ValidationError as e:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<config>'}: {err['msg']}" for err in e.errors()
        )
        raise SpecError(f"invalid {name} config: {details}", "invalid_params") from e


def _known() -> str:
    return ", ".join(["none", *METHODS])


__all__ = [
    "METHODS",
    "MODEL_FAMILIES",
    "REFERENCE_DEPTH",
    "FarSightConfig",
    "KVSmoothConfig",
    "MethodConfig",
    "ModelFamily",
    "PruneHalConfig",
    "SCRConfig",
    "SpecError",
    "parse",
    "scale_layer_range",
]
