"""Several reference methods attached as one: the dense oracle of a composed request.

:class:`ComposedReference` owns the model's hooks and calls its members' hooks in the composition's
order (:data:`~vllm_halluguard.methods.ORDER`): their key masks are united, ``post_attention``
is chained (PruneHal and KVSmooth read the softmax over the kept keys before FarSight's sink scales
``out`` and ``probs``), ``after_attention`` (KVSmooth's EMA) and ``layer_output`` (SCR's edit) run in
turn. In SCR's diagnostic forward only SCR acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..methods.compose import Composition
from .base import ForwardInfo, ReferenceMethod, RequestInfo


class ComposedReference(ReferenceMethod):
    """The members of a :class:`Composition`, each a reference method, behind one set of hooks."""

    config_cls = Composition  # type: ignore[assignment]
    config: Composition  # type: ignore[assignment]

    def __init__(self, config: Composition, members: Sequence[ReferenceMethod]) -> None:
        """``members``: one reference object per member config, in ``config.members``' order."""
        super().__init__(config)  # type: ignore[arg-type]
        self.members = list(members)
        self.needs_visual = any(m.needs_visual for m in self.members)  # type: ignore[misc]
        self.needs_cache = any(m.needs_cache for m in self.members)  # type: ignore[misc]
        for m in self.members:
            m._host = self

    def member(self, name: str) -> ReferenceMethod:
        """The attached member of method ``name`` (e.g. to read its ``trace``)."""
        return next(m for m in self.members if m.config.name == name)

    def _attach(self, model: nn.Module) -> None:
        super()._attach(model)
        assert self.adapter is not None
        for m, cfg in zip(self.members, self.config.members, strict=True):
            m.config, m.adapter = cfg, self.adapter

    def _detach(self) -> None:
        super()._detach()
        for m in self.members:
            m.adapter, m.request, m.fwd = None, None, None

    def set_forward(self, fwd: ForwardInfo | None) -> None:
        self.fwd = fwd
        for m in self.members:
            m.fwd = fwd

    def _active(self) -> list[ReferenceMethod]:
        if self.phase == "diagnostic":
            return [m for m in self.members if m.has_diagnostic]
        return self.members

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        for m in self.members:
            m.prepare_generate(model, kwargs)

    def reset(self, request: RequestInfo) -> None:
        for m in self.members:
            m.request = request
            m.reset(request)

    def on_prefill(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for m in self.members:
            m.on_prefill(model, args, kwargs)

    def key_mask(self, layer: int) -> torch.Tensor | None:
        drop = None
        for m in self._active():
            d = m.key_mask(layer)
            if d is not None:
                drop = d if drop is None else drop | d
        return drop

    def post_attention(self, layer, query, key, logits, probs, out):
        for m in self._active():
            out, probs = m.post_attention(layer, query, key, logits, probs, out)
        return out, probs

    def after_attention(self, layer: int, cache: Any) -> None:
        for m in self._active():
            m.after_attention(layer, cache)

    def layer_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        changed = False
        for m in self._active():
            new = m.layer_output(layer, hidden)
            if new is not None:
                hidden, changed = new, True
        return hidden if changed else None

    def after_forward(self) -> None:
        for m in self.members:
            m.after_forward()
