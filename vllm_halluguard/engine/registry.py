"""The engine's methods by name: one :class:`~vllm_halluguard.engine.base.EngineMethod` each.

Derived from :data:`vllm_halluguard.methods.METHODS`: a method's engine class is the
:class:`EngineMethod` subclass of ``vllm_halluguard/engine/<name>.py`` (docs/contributing.md).
"""

from __future__ import annotations

from vllm_halluguard.engine.base import EngineMethod
from vllm_halluguard.methods import METHODS as CONFIGS
from vllm_halluguard.methods import MethodConfig, implementation


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


def all_methods() -> tuple[EngineMethod, ...]:
    return tuple(METHODS.values())


def method_of(cfg: MethodConfig) -> EngineMethod:
    """The engine class of a config."""
    return METHODS[cfg.name]
