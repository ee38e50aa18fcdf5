"""Paged varlen attention in one Triton kernel, with per-row sinks, a key mask and row statistics.

Same contract as :func:`vllm_halluguard.kernels.paged.paged_attention_ref` (see that module for
the layouts): causal attention of a mixed prefill/decode batch ``q [T, Hq, D]`` over a paged cache
``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` (any strides, e.g. halves of vLLM's Triton
cache view), with

* ``sinks [T, Hq]`` (fp32, ``-inf`` = none): a logit that joins the softmax denominator only, i.e.
  a key with a zero value vector. This is vLLM's per-head ``sinks`` made per row, which is how
  FarSight's register mass ``R = exp(sink)`` is applied: ``out = out_plain * sigmoid(LSE - sink)``;
* ``key_mask [B, >= max seq_len]`` (bool, False = key removed; PruneHal);
* ``return_stats``: the fp32 LSE and the exact entropy of each plain row (real keys only, no sink),
  computed online in the same pass (KVSmooth needs the entropy of each decode row).

Grid and tiles
--------------
``grid = (T // BLOCK_Q + B, Hkv)``. A program owns ``BLOCK_Q`` consecutive query rows of one
sequence and the ``GROUP = Hq // Hkv`` query heads that share KV head ``program_id(1)``, so K/V
are loaded once per GQA group. Its ``BLOCK_M = BLOCK_Q * GROUP`` (padded) rows are laid out row
``r`` -> (query ``r // GROUP``, head ``r % GROUP``). Sequence ``b`` owns the program ids
``query_start_loc[b] // BLOCK_Q + b ...``, which is at least ``cdiv(query_len, BLOCK_Q)`` of them;
a program finds its sequence by binary search over ``query_start_loc`` (which must start at 0)
and exits if it has no rows.
The grid needs only ``q.shape[0]`` and ``seq_lens.shape[0]``: no host sync, CUDA-graph friendly.

Each program walks keys ``0 .. last row's position`` in tiles of ``TILE_N`` keys; each key's page
is looked up in ``block_table`` (``TILE_N`` need not equal the page size). Logits are
``s = scale * q.k``, masked to ``-inf`` outside the causal window or where ``key_mask`` is False.
Dots accumulate in fp32 (``ieee`` for fp32 inputs, so no TF32); P is cast to V's dtype for P.V.

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

Not implemented: split-KV (one program walks the whole context, so very long single-sequence
decodes use few SMs), fp8/quantised caches, sliding window, ALiBi, softcap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
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
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
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
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16: numpy has no bf16 matmul, so dot in fp32 (exact products)
    HAS_SINKS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    RETURN_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

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

    for start in range(0, kv_end, TILE_N):
        keys = start + tl.arange(0, TILE_N)
        key_ok = keys < kv_end
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
        visible = (keys[None, :] <= pos[:, None]) & key_ok[None, :]
        if HAS_MASK:
            kept = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + keys * stride_mk, mask=key_ok, other=0)
            visible = visible & (kept != 0)[None, :]
        x = tl.where(visible, x, float("-inf"))

        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps fully masked rows NaN-free
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(x - m_ref[:, None])
        if RETURN_STATS:
            shift = tl.where(z > 0, m - m_ref, 0.0)
            t = alpha * (t + shift * z) + tl.sum(p * tl.where(visible, x - m_ref[:, None], 0.0), 1)
        z = z * alpha + tl.sum(p, 1)

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

    has_mass = z > 0
    z_safe = tl.where(has_mass, z, 1.0)
    lse2 = tl.where(has_mass, m + tl.log2(z_safe), float("-inf"))
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


INTERPRETED = not isinstance(_paged_attention_kernel, JITFunction)
"""True when ``TRITON_INTERPRET=1`` was set before this module was imported (CPU tensors work)."""


def _launch_config(
    num_tokens: int, num_seqs: int, group: int, head_pad: int, fp32: bool
) -> tuple[int, int, int]:
    """``(BLOCK_M, TILE_N, num_warps)``, chosen so that sm_90 builds do not spill registers (checked
    with ptxas for D = 64..256); GPU tuning is still to do (see benchmarks/kernel_bench.py)."""
    decode_only = num_tokens <= num_seqs  # a heuristic only: any batch is handled correctly
    if fp32:
        block_m, tile_n = 16, 16 if head_pad >= 128 else 32
    elif decode_only:
        block_m, tile_n = 16, 32
    else:
        block_m, tile_n = 64, 64 if head_pad <= 128 else 32
    num_warps = 8 if block_m >= 64 and head_pad > 128 else 4
    return max(block_m, triton.next_power_of_2(group)), tile_n, num_warps


def paged_attention_into(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    entropy: torch.Tensor | None,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
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
) -> None:
    """:func:`paged_attention` writing into preallocated ``out [T, Hq, D]`` (q's dtype) and, if given,
    fp32 ``lse`` and ``entropy [T, Hq]`` (both or neither). No allocation, no host sync.

    ``block_m`` (query rows x heads per program, power of two >= 16), ``tile_n`` (keys per step,
    power of two >= 16) and ``num_warps`` override the launch heuristic.
    """
    t, hq, d = q.shape
    _, page, hkv, d_k = k_cache.shape
    if v_cache.shape != k_cache.shape or d_k != d or hq % hkv:
        raise ValueError(
            f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError("q, k_cache, v_cache and out must share one dtype (fp16, bf16 or fp32)")
    b = seq_lens.shape[0]
    if query_start_loc.shape != (b + 1,) or block_table.shape[0] != b:
        raise ValueError("need query_start_loc [B + 1] and block_table [B, max_blocks] for seq_lens [B]")
    if (lse is None) != (entropy is None):
        raise ValueError("pass both lse and entropy, or neither")
    stats = lse is not None and entropy is not None
    if stats and (lse.shape != (t, hq) or lse.dtype != torch.float32 or lse.stride() != entropy.stride()):
        raise ValueError("lse and entropy must be fp32 [T, Hq] with equal strides")
    if sinks is not None and (sinks.shape != (t, hq) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be fp32 [T, Hq] = [{t}, {hq}], got {sinks.dtype} {tuple(sinks.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape[0] != b):
        raise ValueError("key_mask must be bool [B, max_seq_len]")
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("CPU tensors need TRITON_INTERPRET=1 set before importing this module")
    if t == 0:
        return
    group = hq // hkv
    head_pad = max(16, triton.next_power_of_2(d))
    auto_m, auto_n, auto_warps = _launch_config(t, b, group, head_pad, q.dtype == torch.float32)
    block_m = max(block_m or auto_m, triton.next_power_of_2(group))
    block_q = block_m // group
    dummy = out  # never read when the matching flag is off
    sink_t = sinks if sinks is not None else dummy
    mask_t = key_mask.view(torch.uint8) if key_mask is not None else dummy
    lse_t = lse if stats else dummy
    ent_t = entropy if stats else dummy
    grid = (t // block_q + b, hkv)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        lse_t,
        ent_t,
        sink_t,
        mask_t,
        query_start_loc,
        seq_lens,
        block_table,
        scale * LOG2E.value,
        b,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *(sinks.stride() if sinks is not None else (0, 0)),
        *(lse.stride() if stats else (0, 0)),
        *(key_mask.stride() if key_mask is not None else (0, 0)),
        *block_table.stride(),
        HEAD_SIZE=d,
        HEAD_PAD=head_pad,
        GROUP=group,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n or auto_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        HAS_SINKS=sinks is not None,
        HAS_MASK=key_mask is not None,
        RETURN_STATS=stats,
        num_warps=num_warps or auto_warps,
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Triton twin of :func:`~vllm_halluguard.kernels.paged.paged_attention_ref`, same arguments.

    Returns ``out [T, Hq, D]`` (q's dtype) and, with ``return_stats``, fp32 ``lse, entropy [T, Hq]``.
    """
    out = torch.empty_like(q)
    lse = entropy = None
    if return_stats:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        entropy = torch.empty_like(lse)
    paged_attention_into(
        out, lse, entropy, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale, sinks, key_mask
    )
    return out, lse, entropy
