"""Compositions in the engine: one :class:`CompositeEngine` that runs its members' hooks in order.

A composed request (:class:`~vllm_halluguard.methods.compose.Composition`) keeps one slot and one
``scratch``; each member gets a :class:`RequestState` of its own config sharing both (the members'
scratch keys and per-slot buffers do not collide), so every member method runs unchanged on a
``Row`` of that state.

Attention is computed once per row and layer. The members describe their terms with the *kernel
protocol* of :class:`~vllm_halluguard.engine.base.EngineMethod` (routes for a backend with the
Triton kernel, ``kernel_args``, ``after_kernel``), whatever the real backend:

* a layer some member reworks is computed with every member's sinks and key mask together: by the
  Triton kernel in one launch (kernel path), or by the same computation in torch
  (:func:`~vllm_halluguard.kernels.reference.attention_rows`, CPU path); the row's LSE and entropy
  (kept keys, no sink) go to each reworking member's ``after_kernel``;
* members that only observe the row (PruneHal's prompt row, KVSmooth's ``entropy_of_mean``) then
  run as they do alone;
* a FarSight mode-B sink stays a native sink lane while no other member reworks the row in that
  step; otherwise the sink joins the reworked layers.

On the CPU engine with its native kernels (``Backend.cpu_native``) the members keep their own torch
routes where their terms can be handed over (:meth:`CompositeEngine._native_route`): a member that reworks
the row only to mask keys (PruneHal) computes its output in its own native call, taking the sink lane's
sinks (:class:`~vllm_halluguard.engine.base.RowSinks`), and a member that measures the attention row
(KVSmooth) reads that mask (:class:`~vllm_halluguard.engine.base.KeptKeys`); with nothing reworked the
sink lane stays native and the others observe, as each does alone. Any other case takes the kernel
protocol in torch above.

Members act in :data:`~vllm_halluguard.methods.ORDER` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from vllm_halluguard.engine.base import (
    KEPT_KEYS,
    NATIVE,
    ROW_SINKS,
    Backend,
    EngineMethod,
    Route,
    RowSinks,
    RowSpan,
)
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import RequestState, Row, current
from vllm_halluguard.kernels.reference import attention_rows, attention_rows_padded
from vllm_halluguard.methods import ORDER
from vllm_halluguard.methods.compose import Composition

MEMBERS = "compose_members"
PLAN = "compose_plan"


@dataclasses.dataclass(frozen=True)
class MemberStep:
    """One member of a composed row in this step: its method, row, route and whether it observes.
    ``native``: the member keeps its own torch route (:meth:`CompositeEngine._native_route`) and computes
    its reworked layers in ``run``, as alone."""

    method: EngineMethod
    row: Row
    route: Route
    observes: bool
    native: bool = False


def _plan(row: Row) -> list[MemberStep]:
    return row.request.scratch[PLAN]


class CompositeEngine(EngineMethod):
    """Two or more methods on one request (see the module docstring)."""

    name = "compose"

    def __init__(self, methods: Mapping[str, EngineMethod]) -> None:
        self.methods = methods  # the registry's single methods, by name

    def member_rows(self, row: Row) -> list[tuple[EngineMethod, Row]]:
        """The single-method rows of a composed row, in order."""
        states: list[RequestState] = row.request.scratch[MEMBERS]
        return [(self.methods[s.config.name], Row(row.index, s)) for s in states]

    def check_inputs(self, cfg: Any, images: Sequence[Any], prompt_len: int, vllm_config: Any) -> None:
        for member in cfg.members:
            self.methods[member.name].check_inputs(member, images, prompt_len, vllm_config)

    def init_state(self, runtime: Any, state: RequestState, cached: Any) -> None:
        cfg: Composition = state.config  # type: ignore[assignment]
        states = [
            RequestState(state.req_id, state.slot, m, state.prompt_len, state.scratch) for m in cfg.members
        ]
        state.scratch[MEMBERS] = states
        for s in states:
            self.methods[s.config.name].init_state(runtime, s, cached)

    def release(self, runtime: Any, state: RequestState) -> None:
        for s in state.scratch.get(MEMBERS, ()):
            self.methods[s.config.name].release(runtime, s)

    def route(self, row: Row, span: RowSpan, backend: Backend) -> Route:
        """The members' own routes on the native CPU path where they compose (:meth:`_native_route`);
        else the union of the members' kernel-protocol reworks, or a member's native sink lane alone."""
        members = self.member_rows(row)
        row.request.scratch.pop(KEPT_KEYS, None)
        row.request.scratch.pop(ROW_SINKS, None)
        if backend.cpu_native and not backend.kernel:
            native = self._native_route(row, span, backend, members)
            if native is not None:
                runtime = current()
                if runtime is not None:
                    runtime.stats["compose_member_routes"] += 1
                return native
        view = dataclasses.replace(backend, kernel=True)
        routes = [m.route(r, span, view) for m, r in members]
        reworks = any(rt.rework for rt in routes)
        if reworks and any(rt.sinks is not None for rt in routes):  # the sink joins the reworked layers
            no_lane = dataclasses.replace(view, native_sinks=False)
            routes = [
                m.route(r, span, no_lane) if rt.sinks is not None else rt
                for (m, r), rt in zip(members, routes, strict=True)
            ]
        row.request.scratch[PLAN] = [
            MemberStep(m, r, rt, m.observes(r, span, view))
            for (m, r), rt in zip(members, routes, strict=True)
        ]
        lanes = [rt for rt in routes if rt.sinks is not None]
        if lanes:
            return lanes[0]
        return Route(rework=frozenset().union(*(rt.rework for rt in routes)))

    def _native_route(
        self, row: Row, span: RowSpan, backend: Backend, members: list[tuple[EngineMethod, Row]]
    ) -> Route | None:
        """The members' own torch routes, where at most one member reworks the row and only to mask keys
        (its :meth:`~EngineMethod.kept_keys` covers its reworked layers: handed to the others) and at most
        one runs a sink lane: the lane stays native while nothing is reworked, else the reworking member
        takes its sinks in their layers (:meth:`~EngineMethod.sink_layers` must cover them). ``None``
        where this does not hold (the kernel protocol serves the row)."""
        routes = [m.route(r, span, backend) for m, r in members]
        kept = [m.kept_keys(r) for m, r in members]
        lanes = [i for i, rt in enumerate(routes) if rt.sinks is not None]
        reworking = [i for i, rt in enumerate(routes) if rt.rework]
        if len(lanes) > 1 or len(reworking) > 1 or sum(k is not None for k in kept) > 1:
            return None
        scratch = row.request.scratch
        steps = [
            MemberStep(m, r, rt, m.observes(r, span, backend), native=True)
            for (m, r), rt in zip(members, routes, strict=True)
        ]
        if not reworking:  # nothing masked: the lane (if any) stays native, the others observe
            scratch[PLAN] = steps
            return routes[lanes[0]] if lanes else NATIVE
        (w,) = reworking
        mask = kept[w]
        if mask is None or not routes[w].rework <= set(mask.index):
            return None  # a rework that is not a key mask
        rework = routes[w].rework
        if lanes:
            (i,) = lanes
            lane = routes[i]
            assert lane.sinks is not None
            layers = lane.sink_layers
            if layers is None:
                layers = frozenset(range(backend.num_layers))
            method, member = members[w]
            if not layers <= method.sink_layers(member, span):
                return None
            scratch[ROW_SINKS] = RowSinks(lane.sinks, lane.sink_layers)
            steps[i] = dataclasses.replace(steps[i], route=NATIVE, observes=False)
            rework = rework | layers
        scratch[PLAN] = steps
        scratch[KEPT_KEYS] = mask
        return Route(rework=rework)

    def observes(self, row: Row, span: RowSpan, backend: Backend) -> bool:
        return any(step.observes for step in _plan(row))

    def kernel_args_static(self, row: Row) -> bool:
        return all(m.kernel_args_static(r) for m, r in self.member_rows(row))

    def kernel_sinks_static(self, row: Row) -> bool:
        return all(m.kernel_sinks_static(r) for m, r in self.member_rows(row))

    def kernel_sinks(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        """The summed sink masses of the members reworking this layer."""
        sinks: torch.Tensor | None = None
        for step in _plan(row):
            s = step.method.kernel_sinks(call, step.row) if call.layer in step.route.rework else None
            if s is not None:
                sinks = s.float() if sinks is None else torch.logaddexp(sinks, s.float())
        return sinks

    def kernel_mask(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        """The intersected key masks of the members reworking this layer."""
        mask: torch.Tensor | None = None
        for step in _plan(row):
            m = step.method.kernel_mask(call, step.row) if call.layer in step.route.rework else None
            if m is not None:
                mask = m if mask is None else mask & m
        return mask

    def kernel_args(self, call: LayerCall, row: Row) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sinks (summed masses) and key masks (intersected) of the members reworking this layer."""
        sinks: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        for step in _plan(row):
            if call.layer not in step.route.rework:
                continue
            s, m = step.method.kernel_args(call, step.row)
            if s is not None:
                sinks = s.float() if sinks is None else torch.logaddexp(sinks, s.float())
            if m is not None:
                mask = m if mask is None else mask & m
        return sinks, mask

    def after_kernel(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        self._members_act(call, rows, lse, entropy)

    def run(self, call: LayerCall, rows: list[Row]) -> None:
        """Torch path: the rows reworked in this layer computed once (every member's sinks and mask),
        then the members act in order; on the kernel path only the other rows come here."""
        reworked = [
            row for row in rows if any(call.layer in s.route.rework and not s.native for s in _plan(row))
        ]
        lse = entropy = None
        if reworked:
            lse, entropy = self._attend(call, reworked)
        self._members_act(call, rows, lse, entropy)

    def _attend(self, call: LayerCall, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's computation in torch: output into ``call.output``, LSE and entropy per token.
        Single-token rows together (:meth:`_attend_batch`), the others row by row."""
        n, hq = call.query.shape[:2]
        lse = torch.zeros(n, hq, dtype=torch.float32, device=call.query.device)
        entropy = torch.zeros_like(lse)
        single = [row for row in rows if call.gather_batch is not None and call.is_single(row)]
        if single:
            self._attend_batch(call, single, lse, entropy)
        done = {row.index for row in single}
        for row in rows:
            if row.index in done:
                continue
            start, end, seq_len = call.span(row)
            sinks, mask = self.kernel_args(call, row)
            k, v = call.gather(row.index, seq_len)
            pos = call.positions(row).to(k.device)
            out, row_lse, row_entropy = attention_rows(
                call.query[start:end], k, v, call.scale, pos,
                None if sinks is None else sinks.to(k.device), None if mask is None else mask.to(k.device),
            )  # fmt: skip
            call.output[start:end] = out
            lse[start:end], entropy[start:end] = row_lse, row_entropy
        return lse, entropy

    def _attend_batch(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        """:meth:`_attend` for single-token rows: one padded gather and one masked attention with
        per-row sinks (:func:`~vllm_halluguard.kernels.reference.attention_rows_padded`)."""
        assert call.gather_batch is not None
        terms = [self.kernel_args(call, row) for row in rows]
        seq_lens = [call.seq_lens[row.index] for row in rows]
        k, v, valid = call.gather_batch([row.index for row in rows], seq_lens)
        key_mask = valid.clone()
        sinks = None
        if any(s is not None for s, _ in terms):
            sinks = torch.full((len(rows), call.query.shape[1]), float("-inf"), device=k.device)
        for b, (s, m) in enumerate(terms):
            if m is not None:
                key_mask[b, : seq_lens[b]] &= m.to(key_mask.device)
            if s is not None and sinks is not None:
                sinks[b] = s[0].to(k.device)
        starts = torch.tensor([call.query_start_loc[row.index] for row in rows])
        out, row_lse, probs = attention_rows_padded(call.query[starts], k, v, call.scale, key_mask, sinks)
        call.output[starts] = out
        # the plain row's entropy over the kept keys (hidden keys have probability 0 and add nothing)
        row_entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
        lse[starts], entropy[starts] = row_lse.to(lse.device), row_entropy.to(lse.device)

    def _members_act(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor | None, entropy: torch.Tensor | None
    ) -> None:
        """Per member method, in order: ``after_kernel`` on the rows it reworks in this layer by the kernel
        protocol, ``run`` on the rows it observes or reworks with its own route."""
        for method, reworking, observing in self._acts(call, rows):
            if reworking:
                assert lse is not None and entropy is not None
                method.after_kernel(call, reworking, lse, entropy)
            if observing:
                method.run(call, observing)

    def _acts(self, call: LayerCall, rows: list[Row]) -> Acts:
        """The members' row lists of this layer: the step's (:meth:`prepare_step`) where the call has a
        plan, else made here."""
        if call.plan is None:
            return _acts_of(rows, call.layer)
        acts = _step_acts(call.plan, rows)
        return acts[call.layer] if call.layer in acts else acts[None]

    def prepare_step(self, plan: Any, rows: list[Row], kernel: bool) -> None:
        """Once per step, in the builder: the members' row lists of every layer (the same list objects
        for layers where they are the same, so each member finds its step tables by identity), and the
        members' own ``prepare_step`` on those of the layers that hand them ``rows``. A kernel lane's
        lists are told their layer plan (PruneHal writes its rows' key masks at the lane's positions)."""
        lanes = (plan.default, *plan.layers.values())
        lp = next((lp for lp in lanes if any(r is rows for _, r in lp.lane)), None) if kernel else None
        for layer, acts in _step_acts(plan, rows).items():
            if lp is not None and (layer is None or plan.layer(layer) is not lp):
                continue  # a layer whose lane holds other lists
            for method, reworking, observing in acts:
                if reworking:
                    if lp is not None:
                        plan.prepared[(LANE_OF, id(reworking))] = (reworking, lp)
                    method.prepare_step(plan, reworking, True)  # handed to after_kernel
                if observing:
                    method.prepare_step(plan, observing, False)

    def lane_mask(
        self, call: LayerCall, lp: Any, rows: list[Row], mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The intersection of the members' key masks (:meth:`kernel_mask`), each member writing its rows'
        masks into a mask of its own (:meth:`~vllm_halluguard.engine.base.EngineMethod.lane_mask`)."""
        for method, reworking, _ in self._acts(call, rows):
            if reworking:
                member = method.lane_mask(call, lp, reworking, None)
                if member is not None:
                    mask = member if mask is None else mask & member
        return mask


#: Per member method in order: the method, its rows reworked in a layer and the rows it observes there.
Acts = list[tuple[EngineMethod, list[Row], list[Row]]]
#: ``plan.prepared`` keys: a list's acts by layer (``None``: layers no member reworks), and a member row
#: list's ``(list, layer plan)`` of the kernel lane it is part of.
ACTS = "compose_acts"
LANE_OF = "compose_lane_of"


def _by_method(rows: list[Row]) -> list[list[MemberStep]]:
    """The rows' member steps by method, in :data:`~vllm_halluguard.methods.ORDER`."""
    steps: dict[str, list[MemberStep]] = {}
    for row in rows:
        for step in _plan(row):
            steps.setdefault(step.method.name, []).append(step)
    return [steps[name] for name in ORDER if name in steps]


def _acts_of(rows: list[Row], layer: int | None, by_method: list[list[MemberStep]] | None = None) -> Acts:
    """The members' row lists of ``layer`` (``None``: a layer no member reworks)."""
    out: Acts = []
    for steps in _by_method(rows) if by_method is None else by_method:
        reworking: list[Row] = []
        observing: list[Row] = []
        for step in steps:
            reworks = layer is not None and layer in step.route.rework
            if reworks and not step.native:
                reworking.append(step.row)
            elif step.observes or reworks:
                observing.append(step.row)
        out.append((steps[0].method, reworking, observing))
    return out


def _step_acts(plan: Any, rows: list[Row]) -> dict[int | None, Acts]:
    """:func:`_acts_of` of every layer some member reworks, and of the others (``None``), for ``rows`` (a
    list of the step), made once and kept in ``plan.prepared``; equal lists are one object."""
    entry = plan.prepared.get((ACTS, id(rows)))
    if entry is not None and entry[0] is rows:
        return cast(dict[int | None, Acts], entry[1])
    layers = sorted({layer for row in rows for step in _plan(row) for layer in step.route.rework})
    same: dict[tuple, list[Row]] = {}

    def shared(lst: list[Row], key: str) -> list[Row]:
        return same.setdefault((key, *(r.index for r in lst)), lst)

    out: dict[int | None, Acts] = {}
    by_method = _by_method(rows)
    for layer in (None, *layers):
        acts = _acts_of(rows, layer, by_method)
        out[layer] = [
            (m, shared(rw, f"{m.name}/rework"), shared(ob, f"{m.name}/observe")) for m, rw, ob in acts
        ]
    plan.prepared[(ACTS, id(rows))] = (rows, out)  # holds ``rows``: its id stays unique
    return out
