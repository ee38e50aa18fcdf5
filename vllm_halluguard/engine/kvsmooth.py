"""KVSmooth in the engine: after a decode step's attention, EMA the new token's cached K and V.

Per mitigated decode row and smoothed layer: the current token's attention-row entropy, a push into
the request's FIFO for that layer, the rank lambda, and an in-place overwrite of the token's cache
slot with the EMA of the previous slot. The math is :mod:`vllm_halluguard.methods.kvsmooth`. The CPU
engine's torch path keeps the native kernel's output and computes the entropy from the row's logits over
the paged cache; it defers a step's smoothed layers to the last of them and handles them together (one
K gather per layer, one batched softmax, FIFO push, lambda and EMA of all layers at once:
:func:`defer`, :func:`smooth_layers`), which is exact because a layer's EMA writes only the current
token's slot, read by no later layer of the step. With the Triton kernel the smoothed decode rows are
computed by the kernel, which returns each row's exact entropy with its output
(:meth:`KVSmoothEngine.after_kernel`); the rest of the layer's work (head mean, FIFO push, lambda, EMA
written in the cache) is then one launch of :mod:`vllm_halluguard.kernels.kvsmooth_update` per config
group (:func:`smooth_group_kernel`).

Everything about the rows that is the same in every layer of a step (which rows decode, their tokens,
FIFO slots, the cache addresses of the two slots the EMA reads and of the slot it writes, on the torch
path the padded K gather's page ids) is made once per step by the metadata builder
(:meth:`KVSmoothEngine.prepare_step`, :func:`tables`); a smoothed layer call then runs a fixed
sequence of tensor ops over all its rows, with no per-row Python and no host data.

State: one entropy FIFO (ring buffer + push count) per slot and decoder layer (:class:`Buffers`).
Under tensor parallelism the entropy is averaged over every rank's heads (:func:`entropy`), so all ranks
push the same value and smooth with the same lambda.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from vllm_halluguard.engine import cache_io
from vllm_halluguard.engine.base import KEPT_KEYS, NATIVE, Backend, EngineMethod, KeptKeys, Route, RowSpan
from vllm_halluguard.engine.cpu_cache import page_ids
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import RequestState, Row
from vllm_halluguard.engine.tp import head_mean, tp_group
from vllm_halluguard.kernels import cpu_native
from vllm_halluguard.kernels.reference import (
    attention_logits,
    attention_logits_padded,
    attention_logits_stacked,
)
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, ema, row_entropy, update_lambda
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW


@dataclass
class Buffers:
    """Per-runner KVSmooth state: entropy FIFOs ``queue [slots, layers, W]`` and push counts."""

    queue: torch.Tensor
    count: torch.Tensor


def buffers(runtime: Any) -> Buffers:
    return runtime.ext["kvsmooth"]


def entropy(probs: torch.Tensor, reduce: str) -> torch.Tensor:
    """:func:`~vllm_halluguard.methods.kvsmooth.head_entropy` of rows ``probs [..., Hq, S]`` over the heads
    of every tensor-parallel rank (this rank holds ``Hq`` of them)."""
    if reduce == "mean_entropy":
        return head_mean(row_entropy(probs), -1)
    return row_entropy(head_mean(probs.float(), -2))


def decode_position(call: LayerCall, row: Row) -> int | None:
    """The position of the row's decode token if this layer smooths it, else ``None``."""
    cfg = cast(KVSmoothConfig, row.request.config)
    start, end, seq_len = call.span(row)
    pos = seq_len - 1
    if end - start != 1 or pos < row.request.prompt_len or call.layer not in (cfg.layers or ()):
        return None  # prompt rows (prefill, or a chunk's last token) are never smoothed
    return pos


def smooth(call: LayerCall, row: Row, z: torch.Tensor, prev: tuple, cur: tuple) -> None:
    """FIFO push of entropy ``z [1]``, rank lambda, EMA of ``cur`` (K, V of the token) with ``prev``."""
    state = row.request
    cfg = cast(KVSmoothConfig, state.config)
    buf, slot, m = buffers(call.runtime), state.slot, cfg.window
    lam, queue, count = update_lambda(
        buf.queue[slot, call.layer, :m][None], buf.count[slot, call.layer][None], z.to(buf.queue.device), cfg
    )
    buf.queue[slot, call.layer, :m], buf.count[slot, call.layer] = queue[0], count[0]
    start, _, seq_len = call.span(row)
    if seq_len - 1 == state.prompt_len and not cfg.smooth_first_token:
        lam = torch.zeros_like(lam)
    cur_k, cur_v = cur[0].clone(), cur[1].clone()
    prev_k, prev_v = prev
    if not cfg.recursive:  # 2-tap filter on the raw previous K/V (the prompt's last token is raw anyway)
        raw = state.scratch.setdefault("raw_prev", {})
        prev_k, prev_v = raw.get(call.layer, (prev_k, prev_v))
        raw[call.layer] = (cur_k, cur_v)
    lam = lam.to(cur_k.device)  # the FIFOs may still be on the host (moved by the kernel path)
    new_k, new_v = ema(prev_k[None], cur_k[None], lam), ema(prev_v[None], cur_v[None], lam)
    call.write(call.slot_mapping[start : start + 1], new_k, new_v)


def apply(call: LayerCall, row: Row) -> None:
    """CPU path: entropy from the row's logits over the gathered cache, then :func:`smooth`."""
    pos = decode_position(call, row)
    if pos is None:
        return
    cfg = cast(KVSmoothConfig, row.request.config)
    start, end, seq_len = call.span(row)
    k, v = call.gather(row.index, seq_len)
    logits = attention_logits(call.query[start:end], k, call.scale, torch.tensor([pos]))[0]  # [Hq, S]
    z = entropy(torch.softmax(logits, dim=-1), cfg.head_reduce).reshape(1)
    smooth(call, row, z, (k[pos - 1], v[pos - 1]), (k[pos], v[pos]))


def apply_batch(call: LayerCall, rows: list[Row]) -> None:
    """:func:`apply` for single-token rows: one padded gather, batched entropies, lambdas and EMA."""
    todo = [(row, pos) for row in rows if (pos := decode_position(call, row)) is not None]
    if not todo:
        return
    assert call.gather_batch is not None and call.gather_slots is not None
    indices = [row.index for row, _ in todo]
    k, _, valid = call.gather_batch(indices, [pos + 1 for _, pos in todo], values=False)  # K: entropy
    starts = torch.tensor([call.query_start_loc[row.index] for row, _ in todo])
    probs = torch.softmax(attention_logits_padded(call.query[starts], k, call.scale, valid), dim=-1)
    pos = torch.tensor([p for _, p in todo])
    k2, v2 = call.gather_slots(indices, torch.stack([pos - 1, pos], dim=1))  # the two slots the EMA reads
    prev_k, cur_k, prev_v, cur_v = k2[:, 0], k2[:, 1], v2[:, 0], v2[:, 1]
    # FIFO push and rank lambda, batched over the rows that share a config
    buf, layer = buffers(call.runtime), call.layer
    groups: dict[KVSmoothConfig, list[int]] = {}
    for i, (row, _) in enumerate(todo):
        groups.setdefault(cast(KVSmoothConfig, row.request.config), []).append(i)
    lam = torch.empty(len(todo))
    for cfg, idx in groups.items():
        sel = torch.tensor(idx)
        slots = torch.tensor([todo[i][0].request.slot for i in idx])
        z = entropy(probs[sel], cfg.head_reduce)
        m = cfg.window
        queue, count = buf.queue[slots, layer, :m], buf.count[slots, layer]
        lam[sel], queue, count = update_lambda(queue, count, z.to(queue.device), cfg)
        buf.queue[slots, layer, :m], buf.count[slots, layer] = queue, count
    for i, (row, p) in enumerate(todo):  # per-row options (see :func:`smooth`)
        state = row.request
        cfg = cast(KVSmoothConfig, state.config)
        if p == state.prompt_len and not cfg.smooth_first_token:
            lam[i] = 0.0
        if not cfg.recursive:
            raw = state.scratch.setdefault("raw_prev", {})
            prev_k[i], prev_v[i] = raw.get(layer, (prev_k[i].clone(), prev_v[i].clone()))
            raw[layer] = (cur_k[i].clone(), cur_v[i].clone())
    lam = lam.to(cur_k.device)
    index = starts.to(call.slot_mapping.device)
    call.write(call.slot_mapping[index], ema(prev_k, cur_k, lam), ema(prev_v, cur_v, lam))


class KVSmoothEngine(EngineMethod):
    """KVSmooth: native attention, then the EMA of the new token's K/V (entropy-ranked strength)."""

    name = "kvsmooth"
    batched = True
    tensor_parallel = True  # entropy averaged over every rank's heads (engine/tp.py)
    edits_generated_kv = True
    replays_decode = True  # smoothed K/V and FIFOs of each decode step (engine/replay.py)

    def setup(self, runtime: Any) -> None:
        """The FIFOs on the platform's device (the layers read and write them there)."""
        from vllm.platforms import current_platform

        shape, device = (runtime.capacity, runtime.num_layers), torch.device(current_platform.device_type)
        runtime.ext[self.name] = Buffers(
            torch.zeros(*shape, MAX_KVSMOOTH_WINDOW, device=device),
            torch.zeros(*shape, dtype=torch.long, device=device),
        )

    def init_state(self, runtime: Any, state: RequestState, cached: Any) -> None:
        buf = buffers(runtime)
        buf.queue[state.slot].zero_()
        buf.count[state.slot].zero_()

    def route(self, row: Row, span: RowSpan, backend: Backend) -> Route:
        """Torch path: native (its output is kept; the entropy comes from K). Kernel: the smoothed decode
        rows, whose output and exact entropy come from one launch."""
        cfg = cast(KVSmoothConfig, row.request.config)
        decode = span.num_tokens == 1 and span.seq_len - 1 >= row.request.prompt_len
        if not backend.kernel or not decode or cfg.head_reduce != "mean_entropy":
            return NATIVE
        return Route(rework=frozenset(cfg.layers or ()))

    def observes(self, row: Row, span: RowSpan, backend: Backend) -> bool:
        """Decode rows, on the torch path (entropy from K) or where the kernel lane does not serve them."""
        decode = span.num_tokens == 1 and span.seq_len - 1 >= row.request.prompt_len
        return decode and (not backend.kernel or self.route(row, span, backend).rework == frozenset())

    def observed_layers(self, rows: list[Row]) -> frozenset[int] | None:
        """The smoothed layers of the rows' configs (nothing happens in the others)."""
        return frozenset().union(*(cast(KVSmoothConfig, row.request.config).layers or () for row in rows))

    apply = staticmethod(apply)
    apply_batch = staticmethod(apply_batch)

    def prepare_step(self, plan: Any, rows: list[Row], kernel: bool) -> None:
        """The step's :func:`tables` of ``rows``, made in the builder (a layer call finds them)."""
        tables(plan, rows, keys=not kernel)

    def run(self, call: LayerCall, rows: list[Row]) -> None:
        """Torch path (and rows the kernel lane does not serve): per smoothed layer, one padded K gather
        at the step's page ids, the rows' entropies, then :func:`smooth_group`. On the CPU engine's torch
        path a config group's layers are smoothed together at the last of them (:func:`defer`)."""
        if call.plan is None or call.io is None or call.gather_batch is None:
            super().run(call, rows)
            return
        t = tables(call.plan, rows, keys=True)
        deferred = getattr(call.plan, "rows", None) is None  # the torch path: no step device tables
        for g in t.by_layer.get(call.layer, ()):
            if deferred and not g.pending and _smooth_native(call, g):
                continue
            if g.kept is not None:
                raise RuntimeError("kvsmooth: only the native CPU kernel takes a composition's key mask")
            if deferred:
                defer(call, g)
                continue
            ids, valid, s_max = g.keys(call.io.block_size)
            k = call.io.read_keys(ids, s_max)
            probs = torch.softmax(attention_logits_padded(call.query[g.token], k, call.scale, valid), dim=-1)
            smooth_group(call, g, entropy(probs, g.cfg.head_reduce))
        if t.rest:
            super().run(call, t.rest)

    def after_kernel(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        """The rows' entropies from the kernel (``entropy [T, Hq]``), then one launch of
        :mod:`~vllm_halluguard.kernels.kvsmooth_update` per config group of the step's tables (head mean,
        FIFO, lambda and EMA written in the cache: :func:`smooth_group_kernel`); :func:`smooth_group` in
        torch where that kernel cannot run. No host data is read or copied. Rows without tables (the
        non-recursive option, a call without a plan) go row by row."""
        if call.plan is None or call.io is None:
            rest = rows
        else:
            t = tables(call.plan, rows, keys=False)
            for g in t.by_layer.get(call.layer, ()):
                if not smooth_group_kernel(call, g, entropy):
                    smooth_group(call, g, head_mean(entropy[g.token], -1))
            rest = t.rest
        todo = [row for row in rest if decode_position(call, row) is not None]
        if todo:
            _after_kernel_rows(call, todo, entropy)


@dataclass
class Group:
    """The decode rows of one config in one step, as tensors on the layers' device (:func:`tables`)."""

    cfg: KVSmoothConfig
    layers: frozenset[int]
    token: torch.Tensor  # [B] the rows' tokens in the flat batch
    slot: torch.Tensor  # [B] their FIFO slots
    first: torch.Tensor | None  # [B] bool: at the first generated token (lambda 0); None: smoothed too
    cur: torch.Tensor  # [B] the token's cache slot (the EMA's write)
    positions: torch.Tensor  # [B, 2]: pos - 1 and pos (the EMA's reads)
    table: torch.Tensor  # [B, max_blocks] the rows' block tables (long)
    window: torch.Tensor  # [M] ``arange(cfg.window)`` (the FIFO's positions)
    s_max: int  # the longest row
    #: Whether some row is shorter than ``s_max`` (its padded keys must be masked).
    padded: bool = True
    #: Torch path: this step's smoothed layers so far, ``(layer, query rows [B, Hq, D], cache io, scale)``
    #: each, handled together at the last of ``layers`` (:func:`defer`).
    pending: list[tuple[int, torch.Tensor, Any, float]] = field(default_factory=list, repr=False)
    #: By the cache's block size (the builder's, or the layer cache's if it differs): the cache blocks
    #: and offsets of ``positions``, and the padded K gather's page ids and key mask (torch path).
    _addresses: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _keys: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict, repr=False)
    _launch: dict[str, Any] | None = field(default=None, repr=False)
    lens: torch.Tensor | None = field(default=None, repr=False)  # [B] keys per row (the native kernel's)
    #: Torch path: the key masks its compositions hand the rows (:class:`~vllm_halluguard.engine.base.
    #: KeptKeys`): positions ``[B, N]`` (-1: none), kept ``[B, len(layers), N]`` and each layer's index.
    kept: tuple[torch.Tensor, torch.Tensor, dict[int, int]] | None = field(default=None, repr=False)

    def launch_args(self) -> dict[str, Any]:
        """The config's and rows' arguments of :func:`~vllm_halluguard.kernels.kvsmooth_update.smooth_rows`
        (made by the builder for the kernel path's tables, else on first use)."""
        if self._launch is None:
            cfg = self.cfg
            if cfg.lam_ref is None:
                raise ValueError("KVSmoothConfig.lam_ref is unresolved; call cfg.for_model(...) first")
            first = self.first if self.first is not None else self.token  # never read without flags
            self._launch = {
                "first": first.view(torch.uint8), "window": cfg.window, "has_first": self.first is not None,
                "lo": max(cfg.lam_ref - cfg.clip, 0.0), "hi": min(cfg.lam_ref + cfg.clip, 1.0),
                "inclusive": cfg.rank_inclusive, "by_window": cfg.rank_divisor == "window",
            }  # fmt: skip
        return self._launch

    def addresses(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache blocks and in-block offsets ``[B, 2]`` of ``positions``."""
        out = self._addresses.get(block_size)
        if out is None:
            blocks = self.table.gather(1, self.positions // block_size)
            out = self._addresses[block_size] = (blocks, self.positions % block_size)
        return out

    def keys(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Page ids ``[B, n_blocks]``, key mask ``[B, s_max]`` and ``s_max`` of the rows' K."""
        out = self._keys.get(block_size)
        if out is None:
            ids, valid = page_ids(self.table, self.positions[:, 1] + 1, self.s_max, block_size)
            out = self._keys[block_size] = (ids, valid, self.s_max)
        return out


@dataclass
class Tables:
    """KVSmooth's rows of one hook call, for every layer of the step."""

    by_layer: dict[int, list[Group]] = field(default_factory=dict)
    #: Decode rows served row by row (the non-recursive option reads per-request scratch).
    rest: list[Row] = field(default_factory=list)


def tables(plan: Any, rows: list[Row], keys: bool) -> Tables:
    """The :class:`Tables` of ``rows`` in this step, made on first use and kept in ``plan.prepared``:
    the builder makes those of the row lists its layer plans hand the hooks
    (:meth:`KVSmoothEngine.prepare_step`), so a layer call only looks them up (by the list's identity;
    another list of the same rows, e.g. a composition's, by its row indices)."""
    entry = plan.prepared.get(("kvsmooth", keys, id(rows)))
    if entry is not None and entry[0] is rows:
        return entry[1]
    key = ("kvsmooth", keys, tuple(row.index for row in rows))
    out = plan.prepared.get(key)
    if out is None:
        out = plan.prepared[key] = _build(plan, rows, keys)
    plan.prepared[("kvsmooth", keys, id(rows))] = (rows, out)  # holds ``rows``: its id stays unique
    return out


def _build(plan: Any, rows: list[Row], keys: bool) -> Tables:
    """Group the decode rows by config and make their tensors: on the kernel path from the step's device
    tables (``plan.rows``: no host data), on the torch path (CPU) from the host lists."""
    qsl, seq_lens = plan.query_start_loc, plan.seq_lens
    out = Tables()
    groups: dict[KVSmoothConfig, list[Row]] = {}
    for row in rows:
        i = row.index
        if qsl[i + 1] - qsl[i] != 1 or seq_lens[i] - 1 < row.request.prompt_len:
            continue  # prompt rows are never smoothed
        cfg = cast(KVSmoothConfig, row.request.config)
        if cfg.recursive:
            groups.setdefault(cfg, []).append(row)
        else:
            out.rest.append(row)
    bs = getattr(plan, "block_size", 0)
    device_rows = getattr(plan, "rows", None)
    for cfg, members in groups.items():
        indices = [row.index for row in members]
        if device_rows is None and keys and bs > 0:
            g = _host_group(plan, cfg, members, bs)
            for layer in g.layers:
                out.by_layer.setdefault(layer, []).append(g)
            continue
        if device_rows is not None:
            idx = device_rows.index(indices)
            token, slot, pos = device_rows.last_token[idx], device_rows.slot[idx], device_rows.position[idx]
            prompt_len = device_rows.prompt_len[idx]
        else:
            device = plan.block_table.device
            host = torch.tensor(
                [indices, [qsl[i] for i in indices], [r.request.slot for r in members],
                 [seq_lens[i] - 1 for i in indices], [r.request.prompt_len for r in members]],
            )  # fmt: skip
            idx, token, slot, pos, prompt_len = host.to(device).unbind(0)
        g = Group(
            cfg, frozenset(cfg.layers or ()), token, slot,
            None if cfg.smooth_first_token else pos == prompt_len,
            plan.slot_mapping[token].long(), torch.stack([pos - 1, pos], dim=1), plan.block_table[idx].long(),
            torch.arange(cfg.window, device=token.device), max(seq_lens[i] for i in indices),
            len({seq_lens[i] for i in indices}) > 1,
        )  # fmt: skip
        if bs > 0:  # the builder's block size: the layers' addresses made now, once
            g.addresses(bs)
            if keys:
                g.keys(bs)
        if not keys:  # the kernel path: the launch's arguments made now, once
            g.launch_args()
        for layer in g.layers:
            out.by_layer.setdefault(layer, []).append(g)
    return out


def _host_group(plan: Any, cfg: KVSmoothConfig, members: list[Row], bs: int) -> Group:
    """The torch path's :class:`Group` (the host is the layers' device): every table made from the host
    lists in Python and sent through one tensor, the addresses included (the padded K gather's page ids
    are made on first use: the native kernel reads the block table rows instead)."""
    qsl, seq_lens = plan.query_start_loc, plan.seq_lens
    b = len(members)
    pos = [seq_lens[row.index] - 1 for row in members]
    s_max = max(pos) + 1
    table = plan.block_table[[row.index for row in members]]
    blocks = table.tolist()
    flat = [qsl[row.index] for row in members] + [row.request.slot for row in members]
    flat += [int(p == row.request.prompt_len) for p, row in zip(pos, members, strict=True)]
    for t, p in zip(blocks, pos, strict=True):
        flat += [p - 1, p, t[(p - 1) // bs], t[p // bs], (p - 1) % bs, p % bs]
    flat += [p + 1 for p in pos]
    host = torch.tensor(flat)
    token, slot, first = host[:b], host[b : 2 * b], host[2 * b : 3 * b]
    per_row = host[3 * b : 9 * b].view(b, 3, 2)  # positions, their blocks, their offsets
    g = Group(
        cfg, frozenset(cfg.layers or ()), token, slot, None if cfg.smooth_first_token else first.bool(),
        plan.slot_mapping[token].long(), per_row[:, 0], table.long(), _window(cfg.window), s_max,
        min(pos) < s_max - 1, lens=host[9 * b :],
    )  # fmt: skip
    g._addresses[bs] = (per_row[:, 1], per_row[:, 2])
    kept = [row.request.scratch.get(KEPT_KEYS) for row in members]
    if any(k is not None for k in kept):
        g.kept = _kept_table(kept, sorted(g.layers))
    return g


def _kept_table(
    kept: list[KeptKeys | None], layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """:attr:`Group.kept` of the rows' key masks (a row without one, or a layer outside its mask's, keeps
    every key): a few ops where every row's mask is a row of one batched decision covering ``layers``,
    else row by row."""
    at = {layer: j for j, layer in enumerate(layers)}
    first = kept[0]
    if first is not None and first.row is not None and all(
        k is not None and k.keep is first.keep and k.index == first.index for k in kept
    ) and all(layer in first.index for layer in layers):  # fmt: skip
        rows = torch.tensor([cast(KeptKeys, k).row for k in kept])
        sel = torch.tensor([first.index[layer] for layer in layers])
        keep = first.keep.index_select(0, rows).index_select(1, sel)
        return torch.stack([cast(KeptKeys, k).positions for k in kept]), keep, at
    n = max(k.positions.numel() for k in kept if k is not None)
    positions = torch.full((len(kept), n), -1, dtype=torch.long)
    keep = torch.ones(len(kept), len(layers), n, dtype=torch.bool)
    for b, k in enumerate(kept):
        if k is None:
            continue
        m = k.positions.numel()
        positions[b, :m] = k.positions
        pairs = [(j, k.index[layer]) for j, layer in enumerate(layers) if layer in k.index]
        if pairs:
            mask = k.keep if k.row is None else k.keep[k.row]
            keep[b, [j for j, _ in pairs], :m] = mask[[i for _, i in pairs]]
    return positions, keep, at


@functools.cache
def _window(m: int) -> torch.Tensor:
    """``arange(m)`` on the host (the torch path's FIFO positions)."""
    return torch.arange(m)


def smooth_group(call: LayerCall, g: Group, z: torch.Tensor) -> None:
    """FIFO push of the rows' entropies ``z [B]``, rank lambdas and the EMA of each row's token with its
    previous slot, for all rows of ``g`` at once (a fixed sequence of tensor ops)."""
    _smooth(call.runtime, g, call.layer, [call.io], z)


def defer(call: LayerCall, g: Group) -> None:
    """Torch path: keep this layer's query rows of ``g``; at the last of ``g``'s layers, smooth every
    layer of the step at once (:func:`smooth_layers`). Exact: a smoothed layer's EMA writes only the
    current token's slot in that layer's cache, which nothing in the rest of the step reads (single-token
    rows; the next step's attention reads it). The layers of a step run in ascending order, and every
    layer of ``g`` runs on this rank (pipeline parallelism is refused for KVSmooth)."""
    g.pending.append((call.layer, call.query[g.token], call.io, call.scale))
    if call.layer == max(g.layers):
        pending, g.pending = g.pending, []
        smooth_layers(call.runtime, g, pending)


def _smooth_native(call: LayerCall, g: Group) -> bool:
    """Torch path: the whole smoothed layer of ``g``'s rows in one call of the native CPU kernel
    (:func:`~vllm_halluguard.kernels.cpu_native.kvsmooth_layer`: entropy, FIFO, lambda and EMA written in
    the cache) where it serves the call; returns False, having done nothing, where it does not."""
    views = cache_io.native_views(call)
    if views is None:
        return False
    bs = call.io.block_size
    blocks, offsets = g.addresses(bs)
    if g.lens is None:
        g.lens = g.positions[:, 1] + 1
    buf = device_buffers(call.runtime, call.query.device)
    args = g.launch_args()
    kept = None if g.kept is None else (g.kept[0], g.kept[1][:, g.kept[2][call.layer]])
    cpu_native.kvsmooth_layer(
        call.query, g.token, *views, g.table, g.lens, buf.queue, buf.count, g.slot, call.layer, g.first,
        blocks, offsets, kept=kept, window=g.cfg.window, lo=args["lo"], hi=args["hi"],
        inclusive=args["inclusive"], by_window=args["by_window"],
        entropy_of_mean=g.cfg.head_reduce == "entropy_of_mean", scale=call.scale,
    )  # fmt: skip
    return True


def smooth_layers(runtime: Any, g: Group, pending: list[tuple[int, torch.Tensor, Any, float]]) -> None:
    """The entropies of ``g``'s rows in the ``pending`` layers (one padded K gather per layer, one
    batched softmax), then :func:`_smooth` of all those layers together."""
    layers = [layer for layer, _, _, _ in pending]
    ids, valid, s_max = g.keys(pending[0][2].block_size)
    q = torch.stack([rows for _, rows, _, _ in pending])  # [L, B, Hq, D]
    k = torch.stack([io.read_keys(ids, s_max) for _, _, io, _ in pending])  # [L, B, S, Hkv, D]
    scales = [scale for _, _, _, scale in pending]
    logits = attention_logits_stacked(q, k, scales, valid if g.padded else None)  # [L, B, Hq, S]
    z = entropy(torch.softmax(logits, dim=-1), g.cfg.head_reduce)  # [L, B]
    _smooth(runtime, g, _layer_index(tuple(layers)), [io for _, _, io, _ in pending], z)


@functools.cache
def _layer_index(layers: tuple[int, ...]) -> torch.Tensor:
    """``layers`` as a host index ``[L, 1]`` (the torch path runs on the host)."""
    return torch.tensor(layers)[:, None]


def _smooth(runtime: Any, g: Group, layer: int | torch.Tensor, ios: list[Any], z: torch.Tensor) -> None:
    """FIFO push, rank lambdas and EMA of ``g``'s rows in one layer (``layer`` an int, ``z [B]``, ``ios``
    that layer's cache io) or in several (``layer [L, 1]``, ``z [L, B]``, one cache io per layer)."""
    buf = device_buffers(runtime, z.device)
    cfg = g.cfg
    m = cfg.window
    lam, queue, count = push_rank(buf.queue[g.slot, layer, :m], buf.count[g.slot, layer], z, cfg, g.window)
    buf.queue[g.slot, layer, :m], buf.count[g.slot, layer] = queue, count
    if g.first is not None:
        lam = lam.masked_fill(g.first, 0.0)
    views = _plain_views(ios) if not isinstance(layer, int) else None
    if views is not None:  # every layer's K and V at (pos - 1, pos) in one stack: [2 (K, V), L, B, 2, Hkv, D]
        blocks, offsets = g.addresses(ios[0].block_size)
        kv = torch.stack([half[blocks, offsets] for pair in views for half in pair])
        kv = kv.view(len(ios), 2, *kv.shape[1:]).transpose(0, 1)
    else:
        reads = [io.read_at(*g.addresses(io.block_size)) for io in ios]  # K, V [B, 2 (pos - 1, pos), Hkv, D]
        if isinstance(layer, int):
            kv = torch.stack(reads[0])  # [2 (K, V), B, 2, Hkv, D]
        else:
            kv = torch.stack([torch.stack(kv) for kv in reads], dim=1)  # [2 (K, V), L, B, 2, Hkv, D]
    new = ema(kv[..., 0, :, :], kv[..., 1, :, :], lam[None])
    if isinstance(layer, int):
        ios[0].write(g.cur, new[0], new[1])
    elif views is not None:  # the token's slot (pos) through the views: a copy in the cache's dtype
        at = blocks[:, 1], offsets[:, 1]
        for i, (k_view, v_view) in enumerate(views):
            k_view[at], v_view[at] = new[0, i], new[1, i]
    else:
        for i, io in enumerate(ios):
            io.write(g.cur, new[0, i], new[1, i])


def _plain_views(ios: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The layers' K and V views ``[NB, BS, Hkv, D]`` where every cache has them in the model's dtype
    (one block size): the EMA reads and writes them directly, one index op per tensor, instead of
    through the cache's read and write callbacks."""
    views = []
    for io in ios:
        pair = io.kernel_views()
        quantized = getattr(io, "kv_cache_dtype", "auto") != "auto"
        if pair is None or quantized or io.block_size != ios[0].block_size:
            return None
        views.append(pair)
    return views


_update_module: Any = None


def _kvsmooth_update() -> Any:
    """:mod:`vllm_halluguard.kernels.kvsmooth_update`, imported on first use (Triton: the kernel path)."""
    global _update_module
    if _update_module is None:
        from vllm_halluguard.kernels import kvsmooth_update

        _update_module = kvsmooth_update
    return _update_module


def smooth_group_kernel(call: LayerCall, g: Group, entropy: torch.Tensor) -> bool:
    """:func:`smooth_group` of the kernel path in one Triton launch
    (:func:`~vllm_halluguard.kernels.kvsmooth_update.smooth_rows`: the head mean of ``entropy [T, Hq]``
    at the rows' tokens, FIFO, lambda, EMA written through the cache's kernel views). Under tensor
    parallelism the head mean is all-reduced here first (:func:`head_mean`). Returns False, having done
    nothing, off the kernel path (no step device tables: the torch path, whose compositions also reach
    ``after_kernel``) and where the kernel cannot run (a cache without kernel views, or on the host
    without Triton's interpreter)."""
    if getattr(call.plan, "rows", None) is None:
        return False  # the torch path (a composition's reworked rows on CPU): torch, as the CPU engine serves
    views = call.io.kernel_views()
    kvsmooth_update = _kvsmooth_update()
    if (
        views is None
        or not kvsmooth_update.available(views[0])
        or getattr(call.io, "kv_cache_dtype", "auto") != "auto"
    ):
        return False
    buf = device_buffers(call.runtime, entropy.device)
    z_given = tp_group().world_size > 1
    z = head_mean(entropy[g.token], -1) if z_given else entropy
    kvsmooth_update.smooth_rows(
        buf.queue, buf.count, call.layer, z, g.token, g.slot, cur=g.cur, positions=g.positions, table=g.table,
        k_cache=views[0], v_cache=views[1], z_given=z_given, **g.launch_args(),
    )  # fmt: skip
    return True


def push_rank(
    queue: torch.Tensor, count: torch.Tensor, z: torch.Tensor, cfg: KVSmoothConfig, window: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~vllm_halluguard.methods.kvsmooth.update_lambda` of rows ``queue [..., M]``, ``count [...]``,
    ``z [...]`` in fewer ops (``window``: ``arange(M)`` on the rows' device, made once per step): the
    same push, rank, clip and results. Returns ``(lam, queue, count)``."""
    if cfg.lam_ref is None:
        raise ValueError("KVSmoothConfig.lam_ref is unresolved; call cfg.for_model(...) first")
    m = queue.shape[-1]
    zq = z.to(queue.dtype)[..., None]
    queue = torch.where(window == (count % m)[..., None], zq, queue)
    count = count + 1
    filled = count.clamp(max=m)
    below = (queue <= zq) if cfg.rank_inclusive else (queue < zq)
    k = (below & (window < filled[..., None])).sum(-1)
    lam_hat = k / (m if cfg.rank_divisor == "window" else filled)  # ``filled >= 1`` after the push
    lo, hi = max(cfg.lam_ref - cfg.clip, 0.0), min(cfg.lam_ref + cfg.clip, 1.0)  # both clips at once
    return lam_hat.float().clamp(lo, hi), queue, count


def device_buffers(runtime: Any, device: torch.device) -> Buffers:
    """The FIFOs on the layers' device (made there at setup; moved once if the platform's device differs)."""
    buf = buffers(runtime)
    if buf.queue.device != device:
        buf.queue, buf.count = buf.queue.to(device), buf.count.to(device)
    return buf


def _after_kernel_rows(call: LayerCall, todo: list[Row], entropy: torch.Tensor) -> None:
    """Row by row (the non-recursive option, or a call without the step's tables)."""
    assert call.gather_slots is not None
    pos = torch.tensor([decode_position(call, row) for row in todo])
    k2, v2 = call.gather_slots([row.index for row in todo], torch.stack([pos - 1, pos], dim=1))
    starts = torch.tensor([call.query_start_loc[row.index] for row in todo])
    z = head_mean(entropy[starts.to(entropy.device)], -1)  # [rows]: one reduction for all rows
    for i, row in enumerate(todo):
        smooth(call, row, z[i].reshape(1), (k2[i, 0], v2[i, 0]), (k2[i, 1], v2[i, 1]))
