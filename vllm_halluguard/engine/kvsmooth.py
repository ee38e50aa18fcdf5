"""KVSmooth in the engine: after a decode step's attention, EMA the new token's cached K and V.

Per mitigated decode row and smoothed layer: the current token's attention-row entropy, a push into
the request's FIFO for that layer, the rank lambda, and an in-place overwrite of the token's cache
slot with the EMA of the previous slot. The math is :mod:`vllm_halluguard.methods.kvsmooth`. The CPU
backend computes the entropy here from the row's logits over the paged cache; the Triton backend
gets it from its attention kernel and calls :func:`smooth` directly.
"""

from __future__ import annotations

import torch

from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.runtime import Row
from vllm_halluguard.kernels.reference import attention_logits
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, ema, head_entropy, update_lambda


def decode_position(call: LayerCall, row: Row) -> int | None:
    """The position of the row's decode token if this layer smooths it, else ``None``."""
    cfg: KVSmoothConfig = row.request.config  # type: ignore[assignment]
    start, end, seq_len = call.span(row)
    pos = seq_len - 1
    if end - start != 1 or pos < row.request.prompt_len or call.layer not in (cfg.layers or ()):
        return None  # prompt rows (prefill, or a chunk's last token) are never smoothed
    return pos


def smooth(call: LayerCall, row: Row, z: torch.Tensor, prev: tuple, cur: tuple) -> None:
    """FIFO push of entropy ``z [1]``, rank lambda, EMA of ``cur`` (K, V of the token) with ``prev``."""
    state = row.request
    cfg: KVSmoothConfig = state.config  # type: ignore[assignment]
    rt, slot, m = call.runtime, state.slot, cfg.window
    lam, queue, count = update_lambda(
        rt.kvs_queue[slot, call.layer, :m][None], rt.kvs_count[slot, call.layer][None], z, cfg
    )
    rt.kvs_queue[slot, call.layer, :m], rt.kvs_count[slot, call.layer] = queue[0], count[0]
    start, _, seq_len = call.span(row)
    if seq_len - 1 == state.prompt_len and not cfg.smooth_first_token:
        lam = torch.zeros_like(lam)
    cur_k, cur_v = cur[0].clone(), cur[1].clone()
    prev_k, prev_v = prev
    if not cfg.recursive:  # 2-tap filter on the raw previous K/V (the prompt's last token is raw anyway)
        raw = state.scratch.setdefault("raw_prev", {})
        prev_k, prev_v = raw.get(call.layer, (prev_k, prev_v))
        raw[call.layer] = (cur_k, cur_v)
    new_k, new_v = ema(prev_k[None], cur_k[None], lam), ema(prev_v[None], cur_v[None], lam)
    call.write(call.slot_mapping[start : start + 1], new_k, new_v)


def apply(call: LayerCall, row: Row) -> None:
    """CPU path: entropy from the row's logits over the gathered cache, then :func:`smooth`."""
    pos = decode_position(call, row)
    if pos is None:
        return
    cfg: KVSmoothConfig = row.request.config  # type: ignore[assignment]
    start, end, seq_len = call.span(row)
    k, v = call.gather(row.index, seq_len)
    logits = attention_logits(call.query[start:end], k, call.scale, torch.tensor([pos]))[0]  # [Hq, S]
    z = head_entropy(torch.softmax(logits, dim=-1), cfg.head_reduce).reshape(1)
    smooth(call, row, z, (k[pos - 1], v[pos - 1]), (k[pos], v[pos]))
