"""The engine's methods by name: one :class:`~vllm_halluguard.engine.base.EngineMethod` each.

Adding a method to the engine: its config and math in ``vllm_halluguard/methods/<name>.py``, its
engine class in ``vllm_halluguard/engine/<name>.py``, one line here.
"""

from __future__ import annotations

from vllm_halluguard.engine.base import EngineMethod
from vllm_halluguard.engine.compose import CompositeEngine
from vllm_halluguard.engine.farsight import FarSightEngine
from vllm_halluguard.engine.kvsmooth import KVSmoothEngine
from vllm_halluguard.engine.prunehal import PruneHalEngine
from vllm_halluguard.engine.scr import SCREngine
from vllm_halluguard.methods import Composition, Config, members_of

METHODS: dict[str, EngineMethod] = {
    cls.name: cls() for cls in (KVSmoothEngine, PruneHalEngine, FarSightEngine, SCREngine)
}
#: Methods the engine runs (the others exist in the dense reference only).
ENGINE_METHODS = frozenset(METHODS)
#: Methods that act on image tokens: a request without an image is refused.
IMAGE_METHODS = frozenset(name for name, method in METHODS.items() if method.needs_image)
#: The engine method of every composition (engine/compose.py).
COMPOSITE = CompositeEngine()


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
