"""KVSmooth in the engine: after a decode step's attention, EMA the new token's cached K and V.

Per mitigated decode row and smoothed layer: the current token's attention-row entropy, a push into
the request's FIFO for that layer, the rank lambda, and an in-place overwrite of the token's cache
slot with the EMA of the previous slot. The math is :mod:`vllm_halluguard.methods.kvsmooth`. The CPU
backend computes the entropy here from the row's logits over the paged cache (all decode rows of a
layer call at once in :func:`apply_batch`: their K for the logits, K and V of two slots for the EMA;
the native kernel's output is kept). With the Triton kernel the smoothed decode rows are computed by
the kernel, which returns each row's exact entropy with its output (:meth:`KVSmoothEngine.after_kernel`).

State: one entropy FIFO (ring buffer + push count) per slot and decoder layer (:class:`Buffers`).
Under tensor parallelism the entropy is averaged over every rank's heads (:func:`entropy`), so all ranks
push the same value and smooth with the same lambda.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from vllm_halluguard.engine.base import NATIVE, Backend, EngineMethod, Route, RowSpan
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import RequestState, Row
from vllm_halluguard.engine.tp import head_mean
from vllm_halluguard.kernels.reference import attention_logits, attention_logits_padded
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

    apply = staticmethod(apply)
    apply_batch = staticmethod(apply_batch)

    def after_kernel(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        """The rows' entropies from the kernel, then the FIFO push, lambda and EMA of every row at once,
        on the device: the rows' tokens, positions and slots come from the step's device tables
        (``call.plan.rows``), so no host data is read or copied (the non-recursive option keeps the
        per-row path: its raw previous K/V live in the request's scratch)."""
        todo = [row for row in rows if decode_position(call, row) is not None]
        if not todo:
            return
        tables = None if call.plan is None else call.plan.rows
        if tables is None or not all(cast(KVSmoothConfig, r.request.config).recursive for r in todo):
            _after_kernel_rows(call, todo, entropy)
            return
        assert call.gather_slots is not None
        buf = device_buffers(call.runtime, entropy.device)
        groups: dict[KVSmoothConfig, list[int]] = {}
        for row in todo:
            groups.setdefault(cast(KVSmoothConfig, row.request.config), []).append(row.index)
        layer = call.layer
        for cfg, indices in groups.items():  # rows sharing a config: one batch (usually one group)
            idx = tables.index(indices)
            pos, slots = tables.position[idx], tables.slot[idx]
            z = head_mean(entropy[tables.last_token[idx]], -1)
            m = cfg.window
            lam, queue, count = update_lambda(buf.queue[slots, layer, :m], buf.count[slots, layer], z, cfg)
            buf.queue[slots, layer, :m], buf.count[slots, layer] = queue, count
            if not cfg.smooth_first_token:
                lam = torch.where(pos == tables.prompt_len[idx], torch.zeros_like(lam), lam)
            k2, v2 = call.gather_slots(idx, torch.stack([pos - 1, pos], dim=1))
            tokens = call.slot_mapping[tables.last_token[idx]]
            call.write(tokens, ema(k2[:, 0], k2[:, 1], lam), ema(v2[:, 0], v2[:, 1], lam))


def device_buffers(runtime: Any, device: torch.device) -> Buffers:
    """The FIFOs on the layers' device (made there at setup; moved once if the platform's device differs)."""
    buf = buffers(runtime)
    if buf.queue.device != device:
        buf.queue, buf.count = buf.queue.to(device), buf.count.to(device)
    return buf


def _after_kernel_rows(call: LayerCall, todo: list[Row], entropy: torch.Tensor) -> None:
    """Row by row (the non-recursive option, or a call without the step's device tables)."""
    assert call.gather_slots is not None
    pos = torch.tensor([decode_position(call, row) for row in todo])
    k2, v2 = call.gather_slots([row.index for row in todo], torch.stack([pos - 1, pos], dim=1))
    starts = torch.tensor([call.query_start_loc[row.index] for row in todo])
    z = head_mean(entropy[starts.to(entropy.device)], -1)  # [rows]: one reduction for all rows
    for i, row in enumerate(todo):
        smooth(call, row, z[i].reshape(1), (k2[i, 0], v2[i, 0]), (k2[i, 1], v2[i, 1]))
