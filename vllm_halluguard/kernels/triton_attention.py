"""Paged varlen attention in Triton, with per-row sinks, a key mask, row statistics and split-KV.

Same contract as :func:`vllm_halluguard.kernels.paged.paged_attention_ref` (see that module for
the layouts): causal attention of a mixed prefill/decode batch ``q [T, Hq, D]`` over a paged cache
``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` (any strides: the halves of vLLM's Triton
cache ``[NB, 2, BS, Hkv, D]``, of FlashAttention's ``[2, NB, BS, Hkv, D]`` or of the plugin's
``[NB, Hkv, BS, 2D]``, see :mod:`vllm_halluguard.kernels.layouts`), with

* ``sinks [T, Hq]`` (fp32, ``-inf`` = none): a logit that joins the softmax denominator only, i.e.
  a key with a zero value vector. This is vLLM's per-head ``sinks`` made per row, which is how
  FarSight's register mass ``R = exp(sink)`` is applied: ``out = out_plain * sigmoid(LSE - sink)``;
* ``key_mask [B, >= max seq_len]`` (bool, False = key removed; PruneHal);
* ``return_stats``: the fp32 LSE and the exact entropy of each plain row (real keys only, no sink),
  computed online in the same pass (KVSmooth needs the entropy of each decode row);
* stats only (``out=None``): a K-only pass that reads no V (see "Entropy without V").

Grid and tiles
--------------
``grid = (T // BLOCK_Q + B, Hkv, num_splits)``. A program owns ``BLOCK_Q`` consecutive query rows
of one sequence and the ``GROUP = Hq // Hkv`` query heads that share KV head ``program_id(1)``, so
K/V are loaded once per GQA group. Its ``BLOCK_M = BLOCK_Q * GROUP`` (padded) rows are laid out
row ``r`` -> (query ``r // GROUP``, head ``r % GROUP``). Sequence ``b`` owns the program ids
``query_start_loc[b] // BLOCK_Q + b ...``, which is at least ``cdiv(query_len, BLOCK_Q)`` of them;
a program finds its sequence by binary search over ``query_start_loc`` (which must start at 0)
and exits if it has no rows. The grid needs only ``q.shape[0]``, ``seq_lens.shape[0]`` and host
integers: no host sync, CUDA-graph friendly.

A program walks its keys in tiles of ``TILE_N`` keys; each key's page is looked up in
``block_table`` (``TILE_N`` need not equal the page size). Logits are ``s = scale * q.k``. The walk
has two loops: tiles wholly below the first row's position (every row sees every key: no causal
mask, no bounds check) and the diagonal tiles (causal mask and ``key < end``). With a key mask, a
tile whose keys are all masked is skipped before K/V are loaded (its mask bytes, ``TILE_N`` per
tile, are read anyway; see ``skip_masked_tiles``). Dots accumulate in fp32 (``ieee`` for fp32
inputs, so no TF32); P is cast to V's dtype for P.V.

Online softmax with entropy
---------------------------
Work in base 2: ``x = s * log2(e)``. Per row keep the running max ``m``, the normaliser
``z = sum 2^(x - m)``, ``t = sum 2^(x - m) (x - m)`` and ``acc = sum 2^(x - m) v``. When a tile
raises the max to ``m'``, with ``a = 2^(m - m')`` and ``x - m' = (x - m) + (m - m')``:

* ``z' = a z + sum_tile 2^(x - m')``, ``acc' = a acc + sum_tile 2^(x - m') v``,
* ``t' = a (t + (m - m') z) + sum_tile 2^(x - m') (x - m')``.

At the end ``LSE2 = m + log2 z`` (``LSE = ln2 LSE2``) and, with ``p = 2^(x - m) / z``,
``H = -sum p ln p = ln2 sum p (LSE2 - x) = ln2 (log2 z - t / z)``. In natural units this is the
textbook ``H = m + log z - T/z`` with ``T = sum e^(s - m) s``; keeping ``t`` shifted by ``m``
(``t = T - m z``) makes every term ``u 2^u`` (``u <= 0``) bounded and avoids the cancellation of
``LSE - mean(s)`` when logits are large.

The sink enters only at the end: ``out = (acc / z) / (1 + 2^(sink log2(e) - LSE2))``, i.e.
``out_plain * sigmoid(LSE - sink)``; a ``-inf`` sink divides by exactly 1, so it reproduces the
plain result bit for bit. A row with no visible key gets ``out = 0``, ``lse = -inf``,
``entropy = 0``.

Split-KV (``num_splits = S > 1``)
---------------------------------
When the batch is too small to fill the GPU, each program's key range ``[0, end)`` (``end`` = its
last row's position + 1) is cut into ``S`` segments of ``L = ceil(ceil(end / S) / TILE_N) * TILE_N``
keys; segment ``s`` is ``[s L, min((s + 1) L, end))`` (possibly empty). Boundaries are multiples
of ``TILE_N``, not of the page size, so with ``TILE_N < block_size`` they cut pages. Program
``(i, h, s)`` runs the same online loop over its segment and stores the raw partials
``(m_s, z_s, t_s, acc_s)`` (fp32, base 2, unnormalised) of each row; an empty segment stores
``(-inf, 0, 0, 0)``. A second launch, ``grid = (T, Hkv)``, merges them per row. With
``M = max_s m_s`` and ``w_s = 2^(m_s - M)`` (``w_s = 0`` for an empty segment):

* ``z = sum_s w_s z_s``, ``acc = sum_s w_s acc_s``,
* ``t = sum_s w_s (t_s + (m_s - M) z_s)`` (each segment's ``t_s`` is shifted by ``m_s``; re-shift to
  ``M`` exactly as one online step does),
* then the single-pass ending with ``m = M``: ``LSE2 = M + log2 z``, ``H = ln2 (log2 z - t / z)``,
  ``out = (acc / z) / (1 + 2^(sink log2(e) - LSE2))``.

The key mask and the causal window act inside each segment, so the merge needs nothing about
them; the sink, which is per row, is applied once, after the merge. The merge kernel folds the
segments in order with the online step above (same result, no ``M`` pass first). Partials take
``S * T * Hq * (D + 3) * 4`` bytes of scratch, allocated per call (no host sync; the automatic
split count is only above 1 when ``T`` is small).

Specialisations
---------------
The split count is a runtime argument (only ``SPLIT_KV = S > 1`` is a constexpr), and integers that
change from step to step are not specialised (``MAIN_VARYING``), so one layer geometry has a small
fixed set of compiled variants, which :mod:`.warmup` enumerates and the engine compiles at start-up.
:func:`record_launches` records each launch's :data:`Key` (Triton's own specialisation of the
arguments) or compiles without launching.

Entropy without V (``out=None``)
--------------------------------
With a native-first engine the plain output of a KVSmooth row can come from vLLM's kernel; the
method then needs only the row's entropy (and LSE). The stats-only pass computes ``m, z, t`` and
never loads V: per decode row and KV head it reads ``S_keys * D * elt`` bytes of K instead of
twice that for K and V, so a memory-bound decode should take about half the time of a full pass.
**Unmeasured**: no GPU was available when it was written.

Not implemented: fp8/quantised caches, sliding window, ALiBi, softcap. Launch defaults are the
best of the previous kernel's H200 sweep; the split-KV and stats-only paths are not measured on a
GPU yet (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

logger = logging.getLogger(__name__)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
MAX_SPLITS = 16
"""Most segments the automatic split count uses (vLLM's 3D kernel uses 16 as well)."""
MIN_KEYS_PER_SPLIT = 256
"""With ``max_seq_len`` known, the automatic split count keeps at least this many keys per segment."""
WAVES = 4
"""Automatic split count: aim at about ``WAVES * num_SMs`` programs (a decode program is small)."""

# Triton compiles one binary per specialisation: the constexprs, each pointer's dtype and 16-byte
# alignment, and each integer's class (== 1, a multiple of 16, other). Integers that change from step
# to step (batch size, split count, the key mask's width, scratch strides that grow with T) and the
# strides of tensors read one scalar per row are kept out of the key, so a launch's specialisation
# depends only on the model's geometry and the few flags enumerated by :mod:`.warmup`.
_PER_ROW_STRIDES = ("stride_st", "stride_sh", "stride_lt", "stride_lh", "stride_ps", "stride_ms")
MAIN_VARYING = ("num_seqs", "num_splits", "stride_mb", "stride_bt", *_PER_ROW_STRIDES)
MAIN_UNALIGNED = ("lse_ptr", "ent_ptr", "sink_ptr", "mask_ptr", "qsl_ptr", "seq_lens_ptr", "bt_ptr")
MERGE_VARYING = ("num_splits", *_PER_ROW_STRIDES)
MERGE_UNALIGNED = ("lse_ptr", "ent_ptr", "sink_ptr")


@triton.jit
def _tile(
    q,
    m,
    z,
    t,
    acc,
    start,
    end,
    pos,
    k_ptr,
    v_ptr,
    bt_row,
    mask_row,
    qk_scale,
    kv_head,
    stride_ks,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_mk,
    stride_bj,
    dims,
    dim_ok,
    PAGE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP_MASKED: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    NEED_V: tl.constexpr,
    DIAGONAL: tl.constexpr,  # False: every key of the tile is visible to every row (no checks)
):
    """One online-softmax step over keys ``start .. start + TILE_N`` (keys >= ``end`` ignored)."""
    keys = start + tl.arange(0, TILE_N)
    key_ok = keys < end  # all true off the diagonal (loop bounds); a predicate only
    run = True
    if HAS_MASK:
        kept = tl.load(mask_row + keys * stride_mk, mask=key_ok, other=0) != 0
        if SKIP_MASKED:
            run = tl.max(kept.to(tl.int32), 0) > 0
    if run:
        page = tl.load(bt_row + (keys // PAGE) * stride_bj, mask=key_ok, other=0).to(tl.int64)
        slot = keys % PAGE
        k = tl.load(
            k_ptr
            + page[None, :] * stride_kb
            + slot[None, :] * stride_ks
            + kv_head * stride_kh
            + dims[:, None] * stride_kd,
            mask=dim_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        x = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if DIAGONAL:
            visible = (keys[None, :] <= pos[:, None]) & key_ok[None, :]
            if HAS_MASK:
                visible = visible & kept[None, :]
            x = tl.where(visible, x, float("-inf"))
        elif HAS_MASK:
            x = tl.where(kept[None, :], x, float("-inf"))

        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps fully masked rows NaN-free
        alpha = tl.exp2(m - m_ref)
        u = x - m_ref[:, None]
        p = tl.exp2(u)
        if RETURN_STATS:
            shift = tl.where(z > 0, m - m_ref, 0.0)
            if DIAGONAL or HAS_MASK:
                u = tl.where(x == float("-inf"), 0.0, u)
            t = alpha * (t + shift * z) + tl.sum(p * u, 1)
        z = z * alpha + tl.sum(p, 1)
        if NEED_V:
            v = tl.load(
                v_ptr
                + page[:, None] * stride_vb
                + slot[:, None] * stride_vs
                + kv_head * stride_vh
                + dims[None, :] * stride_vd,
                mask=key_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            p = p.to(v.dtype)  # P.V in the cache dtype, as flash attention does
            if UPCAST:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new
    return m, z, t, acc


@triton.jit
def _finish_rows(
    m,
    z,
    t,
    acc,
    token,
    head,
    row_ok,
    dims,
    dim_ok,
    out_ptr,
    lse_ptr,
    ent_ptr,
    sink_ptr,
    stride_ot,
    stride_oh,
    stride_od,
    stride_st,
    stride_sh,
    stride_lt,
    stride_lh,
    HAS_SINKS: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    NEED_V: tl.constexpr,
):
    """Normalise the running ``(m, z, t, acc)`` of rows and store ``out`` / ``lse`` / ``entropy``."""
    has_mass = z > 0
    z_safe = tl.where(has_mass, z, 1.0)
    lse2 = tl.where(has_mass, m + tl.log2(z_safe), float("-inf"))
    if NEED_V:
        out = acc / z_safe[:, None]
        if HAS_SINKS:
            sink = tl.load(sink_ptr + token * stride_st + head * stride_sh, mask=row_ok, other=float("-inf"))
            excess = tl.where(has_mass, sink * LOG2E - lse2, 0.0)
            out = out / (1.0 + tl.exp2(excess))[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
    if RETURN_STATS:
        entropy = tl.where(has_mass, LN2 * (tl.log2(z_safe) - t / z_safe), 0.0)
        stat_off = token * stride_lt + head * stride_lh
        tl.store(lse_ptr + stat_off, lse2 * LN2, mask=row_ok)
        tl.store(ent_ptr + stat_off, entropy, mask=row_ok)


@triton.jit(do_not_specialize=MAIN_VARYING, do_not_specialize_on_alignment=MAIN_UNALIGNED)
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    ent_ptr,
    sink_ptr,
    mask_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    part_acc_ptr,  # split-KV partials: acc [S, T, Hq, D] and (m, z, t) [S, T, Hq, 3], fp32
    part_mzt_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    num_splits,  # key segments per program (split-KV); a runtime value, see SPLIT_KV
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_st,  # sinks [T, Hq]
    stride_sh,
    stride_lt,  # lse and entropy [T, Hq]
    stride_lh,
    stride_mb,  # key_mask [B, S]
    stride_mk,
    stride_bt,  # block_table [B, max_blocks]
    stride_bj,
    stride_ps,  # partials: split, token, head (acc and mzt share them up to the last dim)
    stride_pt,
    stride_ph,
    stride_ms,
    stride_mt,
    stride_mh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    SPLIT_KV: tl.constexpr,  # num_splits > 1: store partials for the merge launch
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16: numpy has no bf16 matmul, so dot in fp32 (exact products)
    HAS_SINKS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP_MASKED: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    NEED_V: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence of this program: the last b with query_start_loc[b] // BLOCK_Q + b <= pid.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    q_first = (pid - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query row (local) of this tile
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    kv_end = ctx_len + tl.minimum(q_first + BLOCK_Q, q_len)  # last row's position + 1
    # Keys below full_end are visible to every row of the tile (<= the first row's position).
    full_end = (ctx_len + q_first + 1) // TILE_N * TILE_N

    rows = tl.arange(0, BLOCK_M)
    row_q = q_first + rows // GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (row_q < q_len)
    token = (q_begin + row_q).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    pos = ctx_len + row_q
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE

    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    mask_row = mask_ptr + seq.to(tl.int64) * stride_mb

    if not SPLIT_KV:
        seg_lo = 0
        seg_hi = kv_end
    else:
        seg = tl.cdiv(tl.cdiv(kv_end, num_splits), TILE_N) * TILE_N
        seg_lo = split * seg
        seg_hi = tl.minimum(seg_lo + seg, kv_end)
    for start in range(seg_lo, tl.minimum(seg_hi, full_end), TILE_N):
        m, z, t, acc = _tile(
            q, m, z, t, acc, start, seg_hi, pos, k_ptr, v_ptr, bt_row, mask_row, qk_scale, kv_head,
            stride_ks, stride_kb, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_mk, stride_bj, dims, dim_ok, PAGE, TILE_N, DOT_PRECISION, UPCAST, HAS_MASK,
            SKIP_MASKED, RETURN_STATS, NEED_V, False,
        )  # fmt: skip
    for start in range(tl.maximum(seg_lo, full_end), seg_hi, TILE_N):
        m, z, t, acc = _tile(
            q, m, z, t, acc, start, seg_hi, pos, k_ptr, v_ptr, bt_row, mask_row, qk_scale, kv_head,
            stride_ks, stride_kb, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_mk, stride_bj, dims, dim_ok, PAGE, TILE_N, DOT_PRECISION, UPCAST, HAS_MASK,
            SKIP_MASKED, RETURN_STATS, NEED_V, True,
        )  # fmt: skip

    if not SPLIT_KV:
        _finish_rows(
            m, z, t, acc, token, head, row_ok, dims, dim_ok, out_ptr, lse_ptr, ent_ptr, sink_ptr,
            stride_ot, stride_oh, stride_od, stride_st, stride_sh, stride_lt, stride_lh,
            HAS_SINKS, RETURN_STATS, NEED_V,
        )  # fmt: skip
    else:
        part = split * stride_ms + token * stride_mt + head * stride_mh
        tl.store(part_mzt_ptr + part, m, mask=row_ok)
        tl.store(part_mzt_ptr + part + 1, z, mask=row_ok)
        if RETURN_STATS:
            tl.store(part_mzt_ptr + part + 2, t, mask=row_ok)
        if NEED_V:
            tl.store(
                part_acc_ptr
                + (split * stride_ps + token[:, None] * stride_pt + head[:, None] * stride_ph)
                + dims[None, :],
                acc,
                mask=row_ok[:, None] & dim_ok[None, :],
            )


@triton.jit(do_not_specialize=MERGE_VARYING, do_not_specialize_on_alignment=MERGE_UNALIGNED)
def _merge_splits_kernel(
    out_ptr,
    lse_ptr,
    ent_ptr,
    sink_ptr,
    part_acc_ptr,
    part_mzt_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    stride_st,
    stride_sh,
    stride_lt,
    stride_lh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ms,
    stride_mt,
    stride_mh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    NEED_V: tl.constexpr,
):
    """Fold the ``num_splits`` partials of token ``program_id(0)``'s heads of KV head ``program_id(1)``."""
    token = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    head = tl.program_id(1) * GROUP + rows
    tokens = token + tl.zeros([GROUP_PAD], tl.int64)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    z = tl.zeros([GROUP_PAD], tl.float32)
    t = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for s in range(num_splits):
        part = s * stride_ms + token * stride_mt + head * stride_mh
        m_s = tl.load(part_mzt_ptr + part, mask=row_ok, other=float("-inf"))
        z_s = tl.load(part_mzt_ptr + part + 1, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_ref)  # 0 while nothing was folded in
        w = tl.exp2(m_s - m_ref)  # 0 for an empty segment
        if RETURN_STATS:
            t_s = tl.load(part_mzt_ptr + part + 2, mask=row_ok, other=0.0)
            t = a * (t + tl.where(z > 0, m - m_ref, 0.0) * z) + w * (
                t_s + tl.where(z_s > 0, m_s - m_ref, 0.0) * z_s
            )
        z = a * z + w * z_s
        if NEED_V:
            acc_s = tl.load(
                part_acc_ptr
                + (s * stride_ps + token * stride_pt + head[:, None] * stride_ph)
                + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            acc = a[:, None] * acc + w[:, None] * acc_s
        m = m_new
    _finish_rows(
        m, z, t, acc, tokens, head, row_ok, dims, dim_ok, out_ptr, lse_ptr, ent_ptr, sink_ptr,
        stride_ot, stride_oh, stride_od, stride_st, stride_sh, stride_lt, stride_lh,
        HAS_SINKS, RETURN_STATS, NEED_V,
    )  # fmt: skip


INTERPRETED = not isinstance(_paged_attention_kernel, JITFunction)
"""True when ``TRITON_INTERPRET=1`` was set before this module was imported (CPU tensors work)."""


Key = tuple[Any, ...]
"""A launch's specialisation: kernel name, Triton's specialisation of each argument, launch options."""
LaunchMode = Literal["launch", "record", "compile"]
_RECORDINGS: list[tuple[set[Key], LaunchMode]] = []


@contextlib.contextmanager
def record_launches(mode: LaunchMode = "launch") -> Iterator[set[Key]]:
    """Collect the :data:`Key` of every kernel launch made inside the block.

    ``mode``: ``"launch"`` runs the kernels as usual; ``"record"`` only records (nothing runs or
    compiles: a dry run, also in the interpreter); ``"compile"`` compiles each specialisation without
    launching it (Triton's ``warmup``; a no-op in the interpreter). Nested blocks all record; the
    innermost block's mode applies.
    """
    keys: set[Key] = set()
    _RECORDINGS.append((keys, mode))
    try:
        yield keys
    finally:
        _RECORDINGS.pop()


@functools.cache
def _binder(
    fn: Callable[..., Any], varying: tuple[str, ...], unaligned: tuple[str, ...]
) -> Callable[..., Any]:
    """Triton's own argument binder for ``fn`` (what ``JITFunction.run`` keys its kernel cache on).

    Built with ``BaseBackend``'s integer and pointer rules, which the CUDA backend inherits (Triton 3.7's
    internals, imported here so that launching needs only Triton's public API)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import create_function_from_signature

    jit = JITFunction(fn, do_not_specialize=varying, do_not_specialize_on_alignment=unaligned)
    return create_function_from_signature(jit.signature, jit.params, BaseBackend)


_SPECIALISATION = {"_paged_attention_kernel": (MAIN_VARYING, MAIN_UNALIGNED),
                   "_merge_splits_kernel": (MERGE_VARYING, MERGE_UNALIGNED)}  # fmt: skip


def register_specialisation(name: str, varying: tuple[str, ...], unaligned: tuple[str, ...]) -> None:
    """Declare another module's kernel ``name`` (its ``do_not_specialize`` lists) so that
    :func:`_launcher` records its launches too (:mod:`.kvsmooth_update`)."""
    _SPECIALISATION[name] = (varying, unaligned)


def launch_key(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key:
    """The specialisation a launch of ``kernel`` (one of this module's kernels) compiles or reuses."""
    fn = kernel.fn
    _, spec, options = _binder(fn, *_SPECIALISATION[fn.__name__])(*args, **kwargs)
    return (fn.__name__, tuple(spec), tuple(sorted(options.items())))


def _launcher(kernel: Any, grid: tuple[int, ...]) -> Callable[..., Any]:
    """``kernel[grid]``, recording the launch's :data:`Key` inside :func:`record_launches`."""
    if not _RECORDINGS:
        return kernel[grid]

    def launch(*args: Any, **kwargs: Any) -> None:
        key = launch_key(kernel, args, kwargs)
        for keys, _ in _RECORDINGS:
            keys.add(key)
        mode = _RECORDINGS[-1][1]
        if mode == "launch":
            kernel[grid](*args, **kwargs)
        elif mode == "compile":
            kernel.warmup(*args, grid=grid, **kwargs)

    return launch


def _launch_config(
    num_tokens: int, num_seqs: int, group: int, head_pad: int, fp32: bool
) -> tuple[int, int, int, int]:
    """``(BLOCK_M, TILE_N, num_warps, num_stages)``. 16-bit values are the best of the previous
    kernel's H200 sweep (docs/benchmarks.md: 64/64/4 for prefill; decode is left at 16/32 because
    split-KV, not wider tiles, is what fills the GPU at small batch); sm_90 builds of these do not
    spill registers (checked with ptxas for D = 64..256). Not re-tuned for the new paths."""
    decode_only = num_tokens <= num_seqs  # a heuristic only: any batch is handled correctly
    if fp32:
        block_m, tile_n = 16, 16 if head_pad >= 128 else 32
    elif decode_only:
        block_m, tile_n = 16, 32
    else:
        block_m, tile_n = 64, 64 if head_pad <= 128 else 32
    num_warps = 8 if block_m >= 64 and head_pad > 128 else 4
    num_stages = 3  # cp.async pipelining depth on sm_80+ (Triton's default, made explicit)
    return max(block_m, triton.next_power_of_2(group)), tile_n, num_warps, num_stages


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 0 for a CPU (interpreter) tensor."""
    if device.type != "cuda":
        return 0
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def auto_num_splits(programs: int, sms: int, max_seq_len: int | None = None) -> int:
    """Split count for ``programs`` (query tiles x KV heads) on ``sms`` multiprocessors.

    1 when the programs already make ``WAVES`` per SM (or no GPU); otherwise enough segments for
    about ``WAVES * sms`` programs, at most :data:`MAX_SPLITS`, and, when the host knows the longest
    sequence, at least :data:`MIN_KEYS_PER_SPLIT` keys per segment. Host integers only.
    """
    if sms <= 0 or programs >= WAVES * sms:
        return 1
    splits = min(MAX_SPLITS, -(-WAVES * sms // max(programs, 1)))
    if max_seq_len is not None:
        splits = min(splits, max(1, -(-max_seq_len // MIN_KEYS_PER_SPLIT)))
    return max(1, splits)


def paged_attention_into(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    entropy: torch.Tensor | None,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    skip_masked_tiles: bool = True,
) -> None:
    """:func:`paged_attention` writing into preallocated ``out [T, Hq, D]`` (q's dtype) and, if given,
    fp32 ``lse`` and ``entropy [T, Hq]`` (both or neither). No host sync; allocates only split-KV
    scratch.

    ``out=None`` (with ``lse`` and ``entropy``) runs the K-only statistics pass: V is never read
    and ``v_cache`` may be None; ``sinks`` are ignored (the statistics are the plain row's).
    ``block_m`` (query rows x heads per program, power of two >= 16), ``tile_n`` (keys per step,
    power of two >= 16), ``num_warps`` and ``num_stages`` override the launch heuristic.
    ``num_splits``: key segments per program (split-KV, then a merge launch); None picks
    :func:`auto_num_splits` from the grid size and the GPU's SM count (1 on CPU); ``max_seq_len``
    (a host int, optional) only refines that choice. ``skip_masked_tiles``: with a key mask, skip
    tiles whose keys are all masked (a branch in the key loop, which may cost pipelining).
    """
    t, hq, d = q.shape
    _, page, hkv, d_k = k_cache.shape
    need_v = out is not None
    if need_v and (v_cache is None or v_cache.shape != k_cache.shape):
        raise ValueError(
            f"bad shapes: k {tuple(k_cache.shape)}, v {None if v_cache is None else tuple(v_cache.shape)}"
        )
    if d_k != d or hq % hkv:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)}")
    if q.dtype != k_cache.dtype or (need_v and not (q.dtype == v_cache.dtype == out.dtype)):
        raise ValueError("q, k_cache, v_cache and out must share one dtype (fp16, bf16 or fp32)")
    b = seq_lens.shape[0]
    if query_start_loc.shape != (b + 1,) or block_table.shape[0] != b:
        raise ValueError("need query_start_loc [B + 1] and block_table [B, max_blocks] for seq_lens [B]")
    if (lse is None) != (entropy is None):
        raise ValueError("pass both lse and entropy, or neither")
    stats = lse is not None and entropy is not None
    if not need_v and not stats:
        raise ValueError("nothing to compute: pass out, or lse and entropy")
    if stats and (lse.shape != (t, hq) or lse.dtype != torch.float32 or lse.stride() != entropy.stride()):
        raise ValueError("lse and entropy must be fp32 [T, Hq] with equal strides")
    if sinks is not None and (sinks.shape != (t, hq) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be fp32 [T, Hq] = [{t}, {hq}], got {sinks.dtype} {tuple(sinks.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape[0] != b):
        raise ValueError("key_mask must be bool [B, max_seq_len]")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("CPU tensors need TRITON_INTERPRET=1 set before importing this module")
    if t == 0:
        return
    if not need_v:
        sinks = None
    group = hq // hkv
    head_pad = max(16, triton.next_power_of_2(d))
    auto_m, auto_n, auto_warps, auto_stages = _launch_config(t, b, group, head_pad, q.dtype == torch.float32)
    block_m = max(block_m or auto_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid_m = t // block_q + b
    if num_splits is None:
        num_splits = auto_num_splits(grid_m * hkv, num_sms(q.device), max_seq_len)
    dummy = q  # never read or written when the matching flag is off
    out_t = out if need_v else dummy
    v_t = v_cache if need_v else k_cache
    sink_t = sinks if sinks is not None else dummy
    mask_t = key_mask.view(torch.uint8) if key_mask is not None else dummy
    lse_t = lse if stats else dummy
    ent_t = entropy if stats else dummy
    if num_splits > 1:
        part_acc = torch.empty((num_splits, t, hq, d if need_v else 1), dtype=torch.float32, device=q.device)
        part_mzt = torch.empty((num_splits, t, hq, 3), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_mzt = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
    out_strides = out.stride() if need_v else (0, 0, 0)
    sink_strides = sinks.stride() if sinks is not None else (0, 0)
    stat_strides = lse.stride() if stats else (0, 0)
    flags = {
        "HAS_SINKS": sinks is not None,
        "RETURN_STATS": stats,
        "NEED_V": need_v,
    }
    _launcher(_paged_attention_kernel, (grid_m, hkv, num_splits))(
        q,
        k_cache,
        v_t,
        out_t,
        lse_t,
        ent_t,
        sink_t,
        mask_t,
        query_start_loc,
        seq_lens,
        block_table,
        part_acc,
        part_mzt,
        scale * LOG2E.value,
        b,
        num_splits,
        *q.stride(),
        *k_cache.stride(),
        *v_t.stride(),
        *out_strides,
        *sink_strides,
        *stat_strides,
        *(key_mask.stride() if key_mask is not None else (0, 0)),
        *block_table.stride(),
        *part_acc.stride()[:3],
        *part_mzt.stride()[:3],
        HEAD_SIZE=d,
        HEAD_PAD=head_pad,
        GROUP=group,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n or auto_n,
        SPLIT_KV=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        HAS_MASK=key_mask is not None,
        SKIP_MASKED=key_mask is not None and skip_masked_tiles,
        num_warps=num_warps or auto_warps,
        num_stages=num_stages or auto_stages,
        **flags,
    )
    if num_splits > 1:
        _launcher(_merge_splits_kernel, (t, hkv))(
            out_t,
            lse_t,
            ent_t,
            sink_t,
            part_acc,
            part_mzt,
            num_splits,
            *out_strides,
            *sink_strides,
            *stat_strides,
            *part_acc.stride()[:3],
            *part_mzt.stride()[:3],
            HEAD_SIZE=d,
            HEAD_PAD=head_pad,
            GROUP=group,
            GROUP_PAD=triton.next_power_of_2(group),
            num_warps=4,
            **flags,
        )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    **launch: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Triton twin of :func:`~vllm_halluguard.kernels.paged.paged_attention_ref`, same arguments.

    Returns ``out [T, Hq, D]`` (q's dtype) and, with ``return_stats``, fp32 ``lse, entropy [T, Hq]``.
    ``launch``: the keyword-only knobs of :func:`paged_attention_into` (``num_splits`` ...).
    """
    out = torch.empty_like(q)
    lse = entropy = None
    if return_stats:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        entropy = torch.empty_like(lse)
    paged_attention_into(
        out, lse, entropy, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale,
        sinks, key_mask, **launch,
    )  # fmt: skip
    return out, lse, entropy


def paged_attention_stats(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    **launch: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``lse, entropy [T, Hq]`` of the plain rows from K alone (no V read, no output)."""
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    entropy = torch.empty_like(lse)
    paged_attention_into(
        None, lse, entropy, q, k_cache, None, query_start_loc, seq_lens, block_table, scale, None, key_mask,
        **launch,
    )  # fmt: skip
    return lse, entropy
