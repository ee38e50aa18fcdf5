"""KVSmooth's per-layer update of a group of decode rows in one Triton launch.

For each row ``b`` (one program per row), after the attention kernel returned the row's per-head
entropy: the entropy's mean over the query heads, the push into the row's FIFO (ring buffer of
``window`` entries at ``count % window``, ``count + 1``), the rank lambda (entries ``<`` the new value,
``<=`` with ``inclusive``, among the filled ones, divided by the window or by the filled count),
clipped to ``[lo, hi]``, 0 at a first generated token (``first``), then the EMA
``(1 - lam) K_pos + lam K_{pos-1}`` (same for V) read from the paged cache and written in place at
the token's slot. This is :func:`vllm_halluguard.engine.kvsmooth.smooth_group` (FIFO push and rank
:func:`~vllm_halluguard.engine.kvsmooth.push_rank`, EMA :func:`vllm_halluguard.methods.kvsmooth.ema`)
fused, with the same float operations in the same order: given the same mean entropy ``z`` the
FIFO, counts and cache come out bit for bit (the division is IEEE ``div_rn``; the launch turns off
Triton's mul-add fusion so the EMA rounds as torch's separate ops do). The head mean itself is a
``tl.sum`` whose summation order may differ from ``torch.mean``'s (a few ulp of ``z``); under
tensor parallelism the caller all-reduces it in torch and passes ``z`` (``z_given``).

The cache is read and written through the ``[NB, BS, Hkv, D]`` views the attention kernel reads
(:meth:`~vllm_halluguard.engine.cache_io.CacheIO.kernel_views`), at ``cur // BS, cur % BS`` for the
write: where ``CacheIO.write`` stores the token. Everything that varies per request or step (layer,
window, clip bounds, flags, batch size) is a runtime argument; the constexprs depend on the model's
geometry only, so :func:`launch_variant` compiles the one specialisation per layer geometry at
start-up (:mod:`vllm_halluguard.engine.warmup`).

Not run on a GPU (none was available when it was written); compiled for sm_90 on the host, its PTX
has no fused multiply-add, IEEE divisions and round-to-nearest bf16 stores (tests/test_kvsmooth_update.py).
Triton's interpreter casts fp32 to bf16 by truncation, so interpreted bf16 results may differ from
torch's by one bf16 ulp.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from vllm_halluguard.kernels import triton_attention as ta
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW

#: Runtime integers kept out of the specialisation key (they change per request, step or layer).
VARYING = (
    "layer", "window", "num_heads", "z_given", "has_first", "inclusive", "by_window",
    "stride_qs", "stride_ql", "stride_qw", "stride_cs", "stride_cl", "stride_et", "stride_eh",
    "stride_pb", "stride_pp", "stride_tb", "stride_tj",
)  # fmt: skip
#: Pointers to small per-row tensors (indexing results, views): their alignment is not specialised.
UNALIGNED = (
    "queue_ptr", "count_ptr", "ent_ptr", "tok_ptr", "slot_ptr", "first_ptr", "cur_ptr", "pos_ptr",
    "table_ptr",
)  # fmt: skip
M_PAD = triton.next_power_of_2(MAX_KVSMOOTH_WINDOW)


@triton.jit(do_not_specialize=VARYING, do_not_specialize_on_alignment=UNALIGNED)
def _kvsmooth_update_kernel(
    queue_ptr,  # [slots, layers, >= window] fp32
    count_ptr,  # [slots, layers] int64
    ent_ptr,  # [T, Hq] fp32 entropies (or [B] means with z_given)
    tok_ptr,  # [B] the rows' tokens
    slot_ptr,  # [B] their FIFO slots
    first_ptr,  # [B] uint8: at the first generated token (read with has_first)
    cur_ptr,  # [B] the token's cache slot (the write)
    pos_ptr,  # [B, 2] pos - 1, pos (the reads)
    table_ptr,  # [B, max_blocks] block tables
    k_ptr,
    v_ptr,
    layer,
    window,
    lo,
    hi,
    num_heads,
    z_given,
    has_first,
    inclusive,
    by_window,
    stride_qs,
    stride_ql,
    stride_qw,
    stride_cs,
    stride_cl,
    stride_et,
    stride_eh,
    stride_pb,
    stride_pp,
    stride_tb,
    stride_tj,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    PAGE: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(tok_ptr + row).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    # the row's mean entropy over the query heads
    if z_given != 0:
        z = tl.load(ent_ptr + row * stride_et)
    else:
        heads_q = tl.arange(0, HQ_PAD)
        e = tl.load(ent_ptr + token * stride_et + heads_q * stride_eh, mask=heads_q < num_heads, other=0.0)
        z = tl.div_rn(tl.sum(e, 0), num_heads.to(tl.float32))
    # FIFO push at count % window, then the rank of z among the filled entries
    w = tl.arange(0, M_PAD)
    in_window = w < window
    q_row = queue_ptr + slot * stride_qs + layer * stride_ql
    c_ptr = count_ptr + slot * stride_cs + layer * stride_cl
    count = tl.load(c_ptr)
    queue = tl.load(q_row + w * stride_qw, mask=in_window, other=0.0)
    queue = tl.where(w == count % window, z, queue)
    tl.store(q_row + w * stride_qw, queue, mask=in_window)
    count = count + 1
    tl.store(c_ptr, count)
    filled = tl.minimum(count, window)
    below = tl.where(inclusive != 0, queue <= z, queue < z) & (w < filled)
    k = tl.sum(below.to(tl.int32), 0)
    denom = tl.where(by_window != 0, window, filled)
    lam = tl.div_rn(k.to(tl.float32), denom.to(tl.float32))
    lam = tl.minimum(tl.maximum(lam, lo), hi)
    if has_first != 0:
        lam = tl.where(tl.load(first_ptr + row) != 0, 0.0, lam)
    # EMA of the token's K and V with the previous slot's, written at the token's slot
    heads = tl.arange(0, HKV_PAD)
    dims = tl.arange(0, HEAD_PAD)
    ok = (heads < HKV)[:, None] & (dims < HEAD_SIZE)[None, :]
    pos_prev = tl.load(pos_ptr + row * stride_pb)
    pos_cur = tl.load(pos_ptr + row * stride_pb + stride_pp)
    t_row = table_ptr + row * stride_tb
    blk_prev = tl.load(t_row + (pos_prev // PAGE) * stride_tj).to(tl.int64)
    blk_cur = tl.load(t_row + (pos_cur // PAGE) * stride_tj).to(tl.int64)
    off_prev = pos_prev % PAGE
    off_cur = pos_cur % PAGE
    dest = tl.load(cur_ptr + row).to(tl.int64)
    blk_dest = dest // PAGE
    off_dest = dest % PAGE
    k_hd = heads[:, None] * stride_kh + dims[None, :] * stride_kd
    v_hd = heads[:, None] * stride_vh + dims[None, :] * stride_vd
    k_prev = tl.load(k_ptr + blk_prev * stride_kb + off_prev * stride_ks + k_hd, mask=ok, other=0.0)
    k_cur = tl.load(k_ptr + blk_cur * stride_kb + off_cur * stride_ks + k_hd, mask=ok, other=0.0)
    v_prev = tl.load(v_ptr + blk_prev * stride_vb + off_prev * stride_vs + v_hd, mask=ok, other=0.0)
    v_cur = tl.load(v_ptr + blk_cur * stride_vb + off_cur * stride_vs + v_hd, mask=ok, other=0.0)
    keep = 1.0 - lam
    new_k = keep * k_cur.to(tl.float32) + lam * k_prev.to(tl.float32)
    new_v = keep * v_cur.to(tl.float32) + lam * v_prev.to(tl.float32)
    tl.store(
        k_ptr + blk_dest * stride_kb + off_dest * stride_ks + k_hd, new_k.to(k_ptr.dtype.element_ty), mask=ok
    )
    tl.store(
        v_ptr + blk_dest * stride_vb + off_dest * stride_vs + v_hd, new_v.to(v_ptr.dtype.element_ty), mask=ok
    )


ta.register_specialisation("_kvsmooth_update_kernel", VARYING, UNALIGNED)


def smooth_rows(
    queue: torch.Tensor,
    count: torch.Tensor,
    layer: int,
    entropy: torch.Tensor,
    token: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    cur: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    window: int,
    lo: float,
    hi: float,
    has_first: bool,
    inclusive: bool,
    by_window: bool,
    z_given: bool = False,
) -> None:
    """One launch over the ``B = token.shape[0]`` rows (see the module docstring).

    ``queue [slots, layers, >= window]`` (fp32) and ``count [slots, layers]`` (int64) are updated in
    place at ``[slot, layer]``; ``entropy [T, Hq]`` fp32 (or ``z [B]`` with ``z_given``); ``first [B]``
    uint8 (read with ``has_first``); ``cur [B]`` the token's cache slot, ``positions [B, 2]`` (pos - 1,
    pos) and ``table [B, max_blocks]`` the rows' block tables; ``k_cache, v_cache [NB, BS, Hkv, D]``
    (any strides) are written in place. ``lo <= hi``: the clip of the rank. No host sync.
    """
    b = token.shape[0]
    if b == 0:
        return
    hq = 1 if z_given else entropy.shape[1]
    stride_et, stride_eh = (entropy.stride(0), 0) if z_given else entropy.stride()
    ta._launcher(_kvsmooth_update_kernel, (b,))(
        queue, count, entropy, token, slot, first, cur, positions, table, k_cache, v_cache,
        layer, window, lo, hi, hq, int(z_given), int(has_first), int(inclusive), int(by_window),
        *queue.stride(), *count.stride(), stride_et, stride_eh, *positions.stride(), *table.stride(),
        *k_cache.stride(), *v_cache.stride(), **_options(*k_cache.shape[1:], hq),
    )  # fmt: skip


def _pow2(n: int, least: int) -> int:
    """The next power of two ``>= max(n, least)``."""
    return max(least, 1 << (n - 1).bit_length())


@functools.cache
def _options(page: int, hkv: int, d: int, hq: int) -> dict[str, Any]:
    """The launch's constexprs and options for one geometry (made once: a host-cost matter)."""
    return {
        "PAGE": page, "HQ_PAD": _pow2(hq, 2), "HKV": hkv, "HKV_PAD": _pow2(hkv, 2), "HEAD_SIZE": d,
        "HEAD_PAD": _pow2(d, 16), "M_PAD": M_PAD, "num_warps": 1, "enable_fp_fusion": False,
    }  # fmt: skip


def launch_variant(
    num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, z_given: bool = False
) -> None:
    """One launch with the engine's argument types for one layer geometry (``num_heads`` query heads):
    one row at position 1 of block 0 (reads cache slots 0 and 1, writes slot 1; inside
    :func:`~.triton_attention.record_launches` ``("compile")`` nothing runs)."""
    device = k_cache.device
    longs = {"dtype": torch.long, "device": device}
    queue = torch.zeros(1, 1, MAX_KVSMOOTH_WINDOW, device=device)
    count, zero = torch.zeros(1, 1, **longs), torch.zeros(1, **longs)
    entropy = torch.zeros(1, device=device) if z_given else torch.zeros(1, num_heads, device=device)
    first = torch.zeros(1, dtype=torch.bool, device=device).view(torch.uint8)
    smooth_rows(
        queue, count, 0, entropy, zero, zero, first,
        torch.ones(1, **longs), torch.tensor([[0, 1]], **longs), torch.zeros(1, 1, **longs), k_cache, v_cache,
        window=1, lo=0.0, hi=0.0, has_first=False, inclusive=False, by_window=True, z_given=z_given,
    )  # fmt: skip


def available(k_cache: torch.Tensor) -> bool:
    """Whether the kernel can run on ``k_cache``'s device (compiled on a GPU, or interpreted)."""
    return k_cache.device.type != "cpu" or ta.INTERPRETED
