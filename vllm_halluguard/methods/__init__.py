"""Method configs and math: one module per method, one registry.

``parse`` turns what users write (``"kvsmooth"``, ``"none"``, ``{"method": "scr", "lam": 1.1}``) into a
config; ``METHODS`` maps names to config classes. It is the only list of methods: the dense reference
and the engine find a method's classes in ``reference/<name>.py`` and ``engine/<name>.py``
(:func:`implementation`), the server lists what is registered here, and a composition's order and
refusals are the config classes' own (``compose_rank``, ``composition_refusals``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from .base import MODEL_FAMILIES, REFERENCE_DEPTH, MethodConfig, ModelFamily, scale_layer_range
from .compose import Composition, Config, check_pairs, members_of
from .errors import SpecError
from .farsight import FarSightConfig
from .kvsmooth import KVSmoothConfig
from .prunehal import PruneHalConfig
from .scr import SCRConfig

METHODS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (KVSmoothConfig, PruneHalConfig, FarSightConfig, SCRConfig)
}


def order() -> tuple[str, ...]:
    """The registered methods in composition order (ascending ``compose_rank``; a method that declares
    none comes last, and any composition holding it is refused)."""

    def key(name: str) -> tuple[bool, int]:
        value = getattr(METHODS[name], "compose_rank", None)
        return (not isinstance(value, int), value if isinstance(value, int) else 0)

    return tuple(sorted(METHODS, key=key))


def refused_in_composition() -> tuple[str, ...]:
    """The settings :func:`check_pairs` refuses, as ``GET /v1/mitigations`` states them, in :func:`order`."""
    return tuple(
        r.describe(name) for name in order() for r in getattr(METHODS[name], "composition_refusals", ())
    )


#: The registered methods in composition order (each class's ``compose_rank``; :func:`order` reads
#: the registry at call time).
ORDER: tuple[str, ...] = order()

_T = TypeVar("_T")


def implementation(package: str, name: str, base: type[_T]) -> type[_T]:
    """The one subclass of ``base`` defined in module ``package.name`` (a method's reference or engine
    class); ``ImportError`` naming what is missing otherwise."""
    module = importlib.import_module(f"{package}.{name}")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ImportError(
            f"{module.__name__} must define exactly one {base.__name__} subclass for method {name!r}, "
            f"found {[c.__name__ for c in found]}"
        )
    return found[0]


#: Names that mean "no mitigation".
NONE_NAMES = frozenset({"none"})
#: Longest user value quoted back in an error message.
ECHO_LIMIT = 200


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, for quoting user input in errors and logs."""
    return text if len(text) <= limit else f"{text[:limit]}...(cut)"


def short(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (a long string is cut before its repr is built)."""
    return cut(repr(value[: limit + 1] if isinstance(value, str) else value), limit)


def _name(raw: str) -> str:
    """A method name as written: stripped and lower-cased ASCII; anything else is a :class:`SpecError`."""
    name = raw.strip()
    if not name.isascii():  # before lower(): "\u212a" (Kelvin sign) lower-cases to "k"
        raise SpecError(
            f"method name {cut(ascii(raw[: ECHO_LIMIT + 1]))} is not ASCII; known methods: {_known()}",
            "unknown_method",
        )
    if not name:
        raise SpecError(
            f"empty method name; known methods: {_known()} ('none' for no mitigation)", "unknown_method"
        )
    return name.lower()


def parse(obj: Any) -> Config | None:
    """Parse a method spec; ``None`` for no method.

    Accepts ``None``, a :class:`MethodConfig` or :class:`Composition`, a method name (``"kvsmooth"``,
    ``"none"``), a mapping ``{"method": name, **params}`` or a list of names and mappings (``[]`` is
    no method, one item is that method, several compose: :func:`parse_list`). Raises
    :class:`SpecError` (a ``ValueError``) naming the offending name or field otherwise.
    """
    if obj is None or isinstance(obj, MethodConfig | Composition):
        return obj
    if isinstance(obj, list | tuple):
        return parse_list(obj)
    if isinstance(obj, str):
        name, params = _name(obj), {}
    elif isinstance(obj, Mapping):
        if "method" not in obj:
            raise SpecError(
                f"method spec {short(dict(obj))} has no 'method' key; known methods: {_known()}",
                "invalid_spec",
            )
        name = obj["method"]
        if not isinstance(name, str):
            raise SpecError(f"'method' must be a string, got {short(name)}", "invalid_spec")
        name = _name(name)
        params = {k: v for k, v in obj.items() if k != "method"}
    else:
        raise SpecError(f"cannot parse a method spec from {type(obj).__name__}: {short(obj)}", "invalid_spec")
    if name in NONE_NAMES:
        if params:
            raise SpecError(
                f"method 'none' takes no parameters, got {short(sorted(map(str, params)))}", "invalid_params"
            )
        return None
    cls = METHODS.get(name)
    if cls is None:
        raise SpecError(f"unknown method {short(name)}; known methods: {_known()}", "unknown_method")
    try:
        return cls(**params)
    except ValidationError as e:
        details = "; ".join(
            f"{cut('.'.join(str(p) for p in err['loc']) or '<config>')}: {cut(err['msg'])}"
            for err in e.errors()[:5]
        )
        raise SpecError(f"invalid {name} config: {details}", "invalid_params") from e


def parse_list(items: list[Any] | tuple[Any, ...]) -> Config | None:
    """A list spec: ``None`` when empty, the method of a single item, else a :class:`Composition`.

    Members are names or mappings (no nested lists, no ``"none"``, no method twice); a FarSight member
    that names no mode runs the engine's mode C (mode A composes with nothing, :func:`check_pairs`).
    """
    if len(items) <= 1:
        if items and isinstance(items[0], list | tuple):
            raise SpecError("a method list holds names or objects, not lists", "invalid_spec")
        return parse(items[0]) if items else None
    if len(items) > len(METHODS):
        raise SpecError(
            f"a composition holds at most {len(METHODS)} methods (each once), got {len(items)}",
            "invalid_spec",
        )
    members = []
    for item in items:
        if isinstance(item, list | tuple | MethodConfig | Composition):
            raise SpecError(f"a method list holds names or objects, got {short(item, 60)}", "invalid_spec")
        cfg = parse(item)
        if cfg is None:
            raise SpecError("'none' cannot be composed with other methods", "invalid_spec")
        assert isinstance(cfg, MethodConfig)
        if isinstance(cfg, FarSightConfig) and "mode" not in cfg.model_fields_set:
            cfg = cfg.model_copy(update={"mode": "C"})
        members.append(cfg)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise SpecError(f"a method appears twice in the composition {names}", "invalid_spec")
    check_pairs(tuple(members))
    return Composition(tuple(members))


def _known() -> str:
    return ", ".join(["none", *METHODS])


__all__ = [
    "METHODS",
    "MODEL_FAMILIES",
    "ORDER",
    "REFERENCE_DEPTH",
    "Composition",
    "Config",
    "FarSightConfig",
    "KVSmoothConfig",
    "MethodConfig",
    "ModelFamily",
    "PruneHalConfig",
    "SCRConfig",
    "SpecError",
    "cut",
    "implementation",
    "members_of",
    "order",
    "parse",
    "parse_list",
    "refused_in_composition",
    "scale_layer_range",
    "short",
]
