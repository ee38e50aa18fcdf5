"""The engine's methods by name: one :class:`~vllm_halluguard.engine.base.EngineMethod` each.

Derived from :data:`vllm_halluguard.methods.METHODS`: a method's engine class is the
:class:`EngineMethod` subclass of ``vllm_halluguard/engine/<name>.py`` (docs/contributing.md).
"""

from __future__ import annotations

from vllm_halluguard.engine.base import EngineMethod
from vllm_halluguard.engine.compose import CompositeEngine
from vllm_halluguard.engine.state import Row
from vllm_halluguard.methods import METHODS as CONFIGS
from vllm_halluguard.methods import Composition, Config, implementation, members_of


def _engine_method(name: str) -> EngineMethod:
    cls = implementation("vllm_halluguard.engine", name, EngineMethod)
    if cls.name != name:
        raise ImportError(f"{cls.__module__}.{cls.__name__}.name is {cls.name!r}, not {name!r}")
    return cls()


METHODS: dict[str, EngineMethod] = {name: _engine_method(name) for name in CONFIGS}
#: Methods the engine runs (every registered method; the server reads this set).
ENGINE_METHODS = frozenset(METHODS)
#: Methods that act on image tokens: a request without an image is refused.
IMAGE_METHODS = frozenset(name for name, method in METHODS.items() if method.needs_image)
#: The engine method of every composition (engine/compose.py).
COMPOSITE = CompositeEngine(METHODS)


def all_methods() -> tuple[EngineMethod, ...]:
    return tuple(METHODS.values())


def method_of(cfg: Config) -> EngineMethod:
    """The engine class of a config (:data:`COMPOSITE` for a composition)."""
    return COMPOSITE if isinstance(cfg, Composition) else METHODS[cfg.name]


def named(name: str) -> EngineMethod:
    """The engine method of a name that :func:`method_of` returns (a method's, or the composite's)."""
    return COMPOSITE if name == COMPOSITE.name else METHODS[name]


def member_methods(cfg: Config) -> tuple[EngineMethod, ...]:
    """The engine methods of a config's members (one for a single method), in order."""
    return tuple(METHODS[m.name] for m in members_of(cfg))


def member_rows(row: Row) -> list[tuple[EngineMethod, Row]]:
    """The single-method rows of a row: a composed row's members, else ``[(its method, row)]``."""
    if isinstance(row.request.config, Composition):
        return COMPOSITE.member_rows(row)
    return [(METHODS[row.request.config.name], row)]
