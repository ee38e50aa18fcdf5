"""Several methods in one request: :class:`Composition`, its order and the pairs that compose.

A composition is written as a list (``["farsight", {"method": "kvsmooth", "lam_ref": 0.5}]``) and
holds its members in one fixed order, :func:`order` (each config class's ``compose_rank``), whatever
order the user wrote them in, so one set of methods has one canonical spelling (one cache salt, one
metrics label). The order is the order in which the members act inside one attention call
(docs/methods.md, "Composing methods"):
PruneHal's key mask and FarSight's sink shape the row's one softmax; PruneHal, then KVSmooth, read
their statistics from that softmax over the kept keys *without* the sink; FarSight's sink then
scales the output; KVSmooth's EMA rewrites the new token's cached K/V last. SCR acts between
layers (its residual edit on a decoder layer's output is read by the next layer's attention) and
its diagnostic pass is SCR's own: the other members do not act in it. The settings that do not
compose are each config class's ``composition_refusals`` (:func:`check_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import MethodConfig, ModelFamily, Refusal
from .errors import SpecError


def rank(cls: type[MethodConfig]) -> int:
    """A method's ``compose_rank``; :class:`SpecError` (``unsupported``: a 400) if it declares none."""
    value = getattr(cls, "compose_rank", None)
    if not isinstance(value, int):
        raise SpecError(
            f"method {cls.name!r} declares no place in a composition (compose_rank)", "unsupported"
        )
    return value


def refusals(cls: type[MethodConfig]) -> tuple[Refusal, ...]:
    """A method's ``composition_refusals``; :class:`SpecError` (``unsupported``) if it declares none."""
    value = getattr(cls, "composition_refusals", None)
    if not isinstance(value, tuple):
        raise SpecError(
            f"method {cls.name!r} declares no composition rules (composition_refusals)", "unsupported"
        )
    return value


@dataclass(frozen=True)
class Composition:
    """Two or more method configs applied to one request, in :func:`order`."""

    members: tuple[MethodConfig, ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        if len(names) < 2:
            raise ValueError("a composition holds at least two methods")
        if len(set(names)) != len(names):
            raise ValueError(f"a method appears twice in {names}")
        ranked = sorted(self.members, key=lambda m: rank(type(m)))
        object.__setattr__(self, "members", tuple(ranked))

    @property
    def name(self) -> str:
        """The metrics label and allow-list key: member names joined by ``+`` in :func:`order`."""
        return "+".join(m.name for m in self.members)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def member(self, name: str) -> MethodConfig | None:
        """The member config of method ``name`` (``None`` if absent)."""
        return next((m for m in self.members if m.name == name), None)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """``(member.field, value)`` of every member's fields (like a pydantic model's iteration)."""
        for m in self.members:
            for field, value in m:
                yield f"{m.name}.{field}", value

    def canonical(self) -> str:
        """A JSON list of the members' canonical objects, in :func:`order`."""
        return "[" + ",".join(m.canonical() for m in self.members) + "]"

    def for_model(self, model_family: ModelFamily, num_layers: int) -> Composition:
        return Composition(tuple(m.for_model(model_family, num_layers) for m in self.members))

    def is_resolved(self) -> bool:
        return all(m.is_resolved() for m in self.members)

    def is_noop(self) -> bool:
        return all(m.is_noop() for m in self.members)


#: A request's method: one config, or a composition of several.
Config = MethodConfig | Composition


def members_of(cfg: Config) -> tuple[MethodConfig, ...]:
    """The single configs of ``cfg`` (one for a plain method config)."""
    return cfg.members if isinstance(cfg, Composition) else (cfg,)


def check_pairs(members: tuple[MethodConfig, ...]) -> None:
    """Refuse the members that do not compose (:class:`SpecError`, reason ``unsupported``).

    Every pair of the registered methods composes except the settings their classes list in
    ``composition_refusals`` (docs/methods.md, "Composing methods"): today FarSight mode A (it recomputes
    the whole sequence without a KV cache at every step, so there is no cached step for the others to
    act on), KVSmooth's ``entropy_of_mean`` next to PruneHal (that head reduction is computed from the
    cached keys outside the attention call, where PruneHal's key mask is not applied) and PruneHal's
    block-reclaiming variant (its freeing of KV blocks has not been tested inside a composition).
    """
    names = {m.name for m in members}
    for m in members:
        rank(type(m))
        for refusal in refusals(type(m)):
            beside = refusal.beside is None or refusal.beside in names - {m.name}
            if beside and getattr(m, refusal.field) == refusal.value:
                raise SpecError(refusal.message, "unsupported")
