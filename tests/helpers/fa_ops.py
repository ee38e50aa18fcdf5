"""Torch stand-ins for the compiled ops under vLLM's FLASH_ATTN backend, with the real ops' contracts.

Installed as ``torch.ops`` entries, so vLLM's Python over them runs unchanged:

* ``torch.ops._vllm_fa3_C.fwd`` (FA3) and ``torch.ops._vllm_fa2_C.varlen_fwd`` (FA2), called by
  ``flash_attn_varlen_func`` in ``vllm/vllm_flash_attn/flash_attn_interface.py``;
* ``torch.ops._vllm_fa3_C.get_scheduler_metadata``, called by ``get_scheduler_metadata`` there (FA3's
  ahead-of-time schedule; vLLM's builder asks for it when ``aot_schedule``);
* ``torch.ops._C_cache_ops.reshape_and_cache_flash``, called by ``vllm/_custom_ops.py``
  ``reshape_and_cache_flash``.

Every check below names the check of the real op it mirrors: vllm-project/flash-attention
``hopper/flash_api.cpp`` (``mha_fwd``, ``mha_fwd_get_scheduler_metadata``; FA3) and
``csrc/flash_attn/flash_api.cpp`` (``mha_varlen_fwd``; FA2), read at commit 617264c1; vLLM's
``csrc/cache_kernels.cu`` (``reshape_and_cache_flash``) for the cache write. A violated contract
raises :class:`ContractError` with the real op's message.

Deliberate differences, all test-only: q/k/v/out may be fp32 (:data:`RELAX_FP32`; the real ops take
fp16/bf16 or fp8 only, and the CPU test engine runs fp32); the schedule tensor records the batch it
was computed for, and ``fwd`` refuses a schedule of another batch (the real op would read it
silently and compute a wrong result); soft-capping, ALiBi, dropout, rotary and appended KV are not
computed (refused), as vLLM's decoder path on the tested models never passes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: The CPU test engine is fp32; the real ops refuse it (see the module docstring).
RELAX_FP32 = True
HALF = (torch.float16, torch.bfloat16)
#: ``mha_fwd``'s ``max_headdim`` (hopper/flash_api.cpp; 256 in vLLM's build).
FA3_MAX_HEADDIM = 256

_ARCH: dict[str, Callable[[], int]] = {"arch": lambda: 90}
#: Every call, for the tests: (op name, s_aux dtype or None, fa schedule given).
CALLS: list[tuple[str, Any, bool]] = []


class ContractError(RuntimeError):
    """An argument the real op would refuse (``STD_TORCH_CHECK`` / ``TORCH_CHECK``)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ContractError(msg)


def _check_shape(t: torch.Tensor, name: str, *shape: int) -> None:  # CHECK_SHAPE
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_int32_contiguous(t: torch.Tensor, name: str) -> None:
    _check(t.dtype == torch.int32, f"{name} must have dtype torch.int32")
    _check(t.is_contiguous(), f"{name} must be contiguous")  # CHECK_CONTIGUOUS


def _check_qkv_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> None:
    allowed = HALF + ((torch.float8_e4m3fn,) if fp8 else ()) + ((torch.float32,) if RELAX_FP32 else ())
    _check(q.dtype in allowed, "FlashAttention only supports fp16, bf16, and fp8_e4m3 data type")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    for t in (q, k, v):
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")


# --------------------------------------------------------------------------------------- compute


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_q: torch.Tensor,
    seqused_k: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
    causal: bool,
    window: tuple[int, int],
    s_aux: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention over paged K/V (``[pages, page_size, Hk, D]``), bottom-right causal, fp32 math;
    ``s_aux`` [H]: a per-head sink logit in each row's softmax denominator. Returns out, lse ``[H, T]``."""
    hq, hk = q.shape[1], k_pages.shape[2]
    out = torch.zeros(q.shape[0], hq, v_pages.shape[-1], dtype=torch.float32)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32)
    page = k_pages.shape[1]
    for b in range(cu_q.shape[0] - 1):
        lo, hi, n_k = int(cu_q[b]), int(cu_q[b + 1]), int(seqused_k[b])
        if hi == lo or n_k == 0:
            continue
        pages = page_table[b, : (n_k + page - 1) // page].long()
        k = k_pages[pages].reshape(-1, hk, k_pages.shape[-1])[:n_k].float()
        v = v_pages[pages].reshape(-1, hk, v_pages.shape[-1])[:n_k].float()
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        qpos = torch.arange(hi - lo)[:, None] + (n_k - (hi - lo))  # bottom-right aligned
        kpos = torch.arange(n_k)[None, :]
        allowed = torch.ones_like(s[0], dtype=torch.bool)
        if causal or window[1] >= 0:
            allowed &= kpos <= qpos + max(window[1], 0)
        if window[0] >= 0:
            allowed &= kpos >= qpos - window[0]
        s = s.masked_fill(~allowed, float("-inf"))
        if s_aux is not None:
            sink = s_aux.float()[:, None, None].expand(-1, hi - lo, 1)
            s = torch.cat([s, sink], dim=-1)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse[..., None])[..., :n_k]
        out[lo:hi] = torch.einsum("hqk,khd->qhd", p, v)
        lse[:, lo:hi] = row_lse
    return out, lse


# ------------------------------------------------------------------------------------------- FA3


def fa3_get_scheduler_metadata(
    batch_size: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads: int,
    num_heads_k: int,
    headdim: int,
    headdim_v: int,
    qkv_dtype: torch.dtype,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: Any,
    cu_seqlens_k_new: Any,
    seqused_q: Any,
    leftpad_k: Any,
    page_size: int | None,
    max_seqlen_k_new: int,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    has_softcap: bool,
    num_splits: int,
    pack_gqa: Any,
    sm_margin: int,
) -> torch.Tensor:
    """hopper/flash_api.cpp ``mha_fwd_get_scheduler_metadata``."""
    allowed = (*HALF, torch.float8_e4m3fn) + ((torch.float32,) if RELAX_FP32 else ())
    _check(qkv_dtype in allowed, "FlashAttention only supports fp16, bf16, and fp8_e4m3 data type")
    _check(num_heads % num_heads_k == 0, "Number of heads in key/value must divide number of heads in query")
    _check(seqused_k.dtype == torch.int32, "seqused_k must have dtype int32")
    _check_shape(seqused_k, "seqused_k", batch_size)
    if cu_seqlens_q is not None:
        _check_int32_contiguous(cu_seqlens_q, "cu_seqlens_q")
        _check_shape(cu_seqlens_q, "cu_seqlens_q", batch_size + 1)
    # vLLM's builder sizes its persistent copy 1 + round_up(b, 4) * 4 (flash_attn.py); the stand-in
    # records the batch the schedule was made for in its first entries (see the module docstring).
    meta = torch.zeros(1 + -(-batch_size // 4) * 4 * 4, dtype=torch.int32)
    meta[:3] = torch.tensor([batch_size, max_seqlen_k, int(seqused_k.sum())], dtype=torch.int32)
    return meta


def fa3_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_new: Any,
    v_new: Any,
    q_v: Any,
    out: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: Any,
    cu_seqlens_k_new: Any,
    seqused_q: Any,
    seqused_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    page_table: torch.Tensor | None,
    kv_batch_idx: Any,
    leftpad_k: Any,
    rotary_cos: Any,
    rotary_sin: Any,
    seqlens_rotary: Any,
    q_descale: Any,
    k_descale: Any,
    v_descale: Any,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    is_rotary_interleaved: bool,
    scheduler_metadata: torch.Tensor | None,
    num_splits: int,
    pack_gqa: Any,
    sm_margin: int,
    s_aux: torch.Tensor | None,
    cp_world_size: int,
    cp_rank: int,
    cp_tot_seqused_k: Any,
) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """hopper/flash_api.cpp ``mha_fwd`` (the paged, varlen-q decoder call vLLM makes)."""
    arch = _ARCH["arch"]()
    CALLS.append(("fa3", None if s_aux is None else s_aux.dtype, scheduler_metadata is not None))
    _check(arch >= 80, "FlashAttention only supports Ampere GPUs or newer.")
    _check_qkv_dtype(q, k, v, fp8=arch >= 90)
    for unsupported, name in (
        (k_new, "k_new"),
        (q_v, "q_v"),
        (rotary_cos, "rotary_cos"),
        (kv_batch_idx, "kv_batch_idx"),
        (leftpad_k, "leftpad_k"),
        (seqused_q, "seqused_q"),
        (cp_tot_seqused_k, "cp_tot_seqused_k"),
    ):
        if unsupported is not None:
            raise NotImplementedError(f"stand-in: {name} is not computed")
    _check(page_table is not None, "stand-in: only the paged KV call vLLM's decoder path makes")
    assert page_table is not None
    _check(page_table.dtype == torch.int32, "page_table must have dtype torch.int32")
    _check(page_table.stride(-1) == 1, "page_table must have contiguous last dimension")
    _check(cu_seqlens_q is not None, "stand-in: varlen q (cu_seqlens_q) only")
    assert cu_seqlens_q is not None
    _check_int32_contiguous(cu_seqlens_q, "cu_seqlens_q")
    _check(max_seqlen_q is not None, "max_seqlen_q must be provided if cu_seqlens_q is provided")
    _check(cu_seqlens_k is None, "If cu_seqlens_k is passed in, then page table is not supported")
    batch_size = cu_seqlens_q.shape[0] - 1
    num_heads, head_size = q.shape[1], q.shape[2]
    num_pages, page_size, num_heads_k = k.shape[0], k.shape[1], k.shape[2]
    head_size_v = v.shape[-1]
    _check(
        head_size <= FA3_MAX_HEADDIM,
        f"FlashAttention forward only supports head dimension at most {FA3_MAX_HEADDIM}",
    )
    _check(num_heads % num_heads_k == 0, "Number of heads in key/value must divide number of heads in query")
    _check_shape(q, "q", q.shape[0], num_heads, head_size)
    _check_shape(k, "k", num_pages, page_size, num_heads_k, head_size)
    _check_shape(v, "v", num_pages, page_size, num_heads_k, head_size_v)
    _check_shape(page_table, "page_table", batch_size, page_table.shape[1])
    _check(seqused_k is not None, "stand-in: seqused_k is required with a page table")
    assert seqused_k is not None
    _check(seqused_k.dtype == torch.int32, "seqused_k must have dtype int32")
    _check(seqused_k.is_contiguous(), "seqused_k must be contiguous")
    _check_shape(seqused_k, "seqused_k", batch_size)
    alignment = 16 if q.dtype == torch.float8_e4m3fn else 8
    _check(head_size % alignment == 0, f"head_size should be a multiple of {alignment}")
    _check(head_size_v % alignment == 0, f"head_size_v should be a multiple of {alignment}")
    if out is not None:
        _check(
            out.dtype == (torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype),
            "For FP16/BF16 input, output must have the same dtype as inputs. "
            "For FP8 input, output must have dtype BF16",
        )
        _check(out.stride(-1) == 1, "Output tensor must have contiguous last dimension")
        _check_shape(out, "out", q.shape[0], num_heads, head_size_v)
    if scheduler_metadata is not None:
        _check(scheduler_metadata.is_contiguous(), "scheduler_metadata must be contiguous")
        _check(scheduler_metadata.dtype == torch.int32, "scheduler_metadata must have dtype int32")
        _check_shape(scheduler_metadata, "scheduler_metadata", 1 + -(-batch_size // 4) * 4 * 4)
        made_for = scheduler_metadata[:3].tolist()
        _check(
            made_for == [batch_size, max_seqlen_k, int(seqused_k.sum())],
            f"stand-in: a schedule made for the batch {made_for}, used for "
            f"{[batch_size, max_seqlen_k, int(seqused_k.sum())]}",
        )
    _check(num_splits <= 256, "num_splits > 256 not supported")
    if q.dtype == torch.float8_e4m3fn:
        for d, name in ((q_descale, "q_descale"), (k_descale, "k_descale"), (v_descale, "v_descale")):
            if d is not None:
                _check_shape(d, name, batch_size, num_heads_k)
    if s_aux is not None:
        _check(arch == 90, "S aux is currently only supported for Hopper GPUs")
        _check(num_heads <= 64, "We only support query heads <= 64 with S aux")
        _check(head_size == head_size_v, "We don't support S aux with hdim != hdim_v")
        _check(s_aux.dtype == torch.bfloat16, "We only support bf16 dtype for S aux.")
        _check_shape(s_aux, "s_aux", num_heads)
        _check(s_aux.is_contiguous(), "s_aux must be contiguous")
    _check(cp_world_size > 0, "cp_world_size must be positive")
    _check(cp_world_size != 1 or cp_rank == 0, "When context parallelism is disabled, cp_rank must be zero")
    if softcap:
        raise NotImplementedError("stand-in: soft-capping is not computed")
    res, lse = paged_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        seqused_k,
        page_table,
        softmax_scale,
        is_causal,
        (window_size_left, window_size_right),
        s_aux,
    )
    if out is None:
        out = torch.empty(q.shape[0], num_heads, head_size_v, dtype=q.dtype)
    out.copy_(res)
    return out, lse, None, None


# ------------------------------------------------------------------------------------------- FA2


def fa2_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None,
    leftpad_k: Any,
    block_table: torch.Tensor | None,
    alibi_slopes: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    p_dropout: float,
    softmax_scale: float,
    zero_tensors: bool,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    return_softmax: bool,
    num_splits: int,
    unused_generator_compat: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc/flash_attn/flash_api.cpp ``mha_varlen_fwd`` (FA2 takes no ``s_aux``, schedule or descale:
    ``flash_attn_varlen_func`` refuses those before this op)."""
    CALLS.append(("fa2", None, False))
    _check(unused_generator_compat is None, "unused_generator_compat must be None")
    _check(_ARCH["arch"]() >= 80, "FlashAttention only supports Ampere GPUs or newer.")
    _check_qkv_dtype(q, k, v, fp8=False)
    _check(cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must have dtype int32")
    _check(cu_seqlens_k.dtype == torch.int32, "cu_seqlens_k must have dtype int32")
    _check(block_table is not None, "stand-in: only the paged KV call vLLM's decoder path makes")
    assert block_table is not None
    _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
    _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
    _check(cu_seqlens_q.is_contiguous(), "cu_seqlens_q must be contiguous")
    _check(cu_seqlens_k.is_contiguous(), "cu_seqlens_k must be contiguous")
    batch_size = cu_seqlens_q.shape[0] - 1
    num_heads, head_size = q.shape[1], q.shape[2]
    num_blocks, page_block_size, num_heads_k = k.shape[0], k.shape[1], k.shape[2]
    _check(page_block_size % 16 == 0, "Paged KV cache block size must be divisible by 16")
    _check(batch_size > 0, "batch size must be positive")
    _check(head_size <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(head_size % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(num_heads % num_heads_k == 0, "Number of heads in key/value must divide number of heads in query")
    _check_shape(k, "k", num_blocks, page_block_size, num_heads_k, head_size)
    _check_shape(v, "v", num_blocks, page_block_size, num_heads_k, head_size)
    _check_shape(block_table, "block_table", batch_size, block_table.shape[1])
    _check_shape(cu_seqlens_q, "cu_seqlens_q", batch_size + 1)
    _check_shape(cu_seqlens_k, "cu_seqlens_k", batch_size + 1)
    _check(seqused_k is not None, "stand-in: seqused_k is required with a block table")
    assert seqused_k is not None
    _check(seqused_k.dtype == torch.int32, "seqused_k must have dtype int32")
    _check(seqused_k.is_contiguous(), "seqused_k must be contiguous")
    _check_shape(seqused_k, "seqused_k", batch_size)
    if out is not None:
        _check(out.dtype == q.dtype, "Output must have the same dtype as inputs")
        _check(out.stride(-1) == 1, "Output tensor must have contiguous last dimension")
        _check_shape(out, "out", q.shape[0], num_heads, head_size)
    if alibi_slopes is not None or softcap or p_dropout:
        raise NotImplementedError("stand-in: ALiBi, soft-capping and dropout are not computed")
    res, lse = paged_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        seqused_k,
        block_table,
        softmax_scale,
        is_causal,
        (window_size_left, window_size_right),
        None,
    )
    if out is None:
        out = torch.empty_like(q)
    out.copy_(res)
    return out, lse


# ------------------------------------------------------------------------------------ cache write


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """vLLM csrc/cache_kernels.cu ``reshape_and_cache_flash``: one token per slot of ``slot_mapping``
    (its length is the token count; ``key`` may be longer, padded), negative slots skipped; caches
    ``[num_blocks, block_size, num_heads, head_size]`` (any block/page/head strides, contiguous last
    dim); each token's ``num_heads * head_size`` values read from ``key[token]`` as one run."""
    CALLS.append(("cache", None, False))
    _check(slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1, "slot_mapping: int64 [num_tokens]")
    _check(kv_cache_dtype == "auto", "stand-in: only kv_cache_dtype='auto'")
    n = slot_mapping.shape[0]
    _check(key.shape[0] >= n and value.shape[0] >= n, "key/value hold fewer tokens than slot_mapping")
    _check(
        key_cache.dim() == 4 and key_cache.shape == value_cache.shape,
        "caches: [blocks, block_size, heads, head_size]",
    )
    _, block_size, num_heads, head_size = key_cache.shape
    for t, name in ((key, "key"), (value, "value")):
        _check(tuple(t.shape[1:]) == (num_heads, head_size), f"{name}: [tokens, {num_heads}, {head_size}]")
        _check(t.stride(2) == 1 and t.stride(1) == head_size, f"{name}: each token's heads must be one run")
    for c, name in ((key_cache, "key_cache"), (value_cache, "value_cache")):
        _check(c.stride(-1) == 1, f"{name} must have a contiguous last dimension")
        _check(
            c.dtype == key.dtype, f"{name}: dtype {c.dtype} != key dtype {key.dtype} (kv_cache_dtype='auto')"
        )
    slots = slot_mapping
    valid = slots >= 0
    _check(bool((slots[valid] < key_cache.shape[0] * block_size).all()), "slot out of range")
    idx = slots[valid]
    key_cache[idx // block_size, idx % block_size] = key[:n][valid]
    value_cache[idx // block_size, idx % block_size] = value[:n][valid]


def install(arch: Callable[[], int]) -> None:
    """Register the stand-ins where vLLM's Python looks the compiled ops up (``torch.ops``)."""
    _ARCH["arch"] = arch
    torch.ops._vllm_fa3_C.fwd = fa3_fwd  # type: ignore[attr-defined]
    torch.ops._vllm_fa3_C.get_scheduler_metadata = fa3_get_scheduler_metadata  # type: ignore[attr-defined]
    torch.ops._vllm_fa2_C.varlen_fwd = fa2_varlen_fwd  # type: ignore[attr-defined]
    torch.ops._C_cache_ops.reshape_and_cache_flash = reshape_and_cache_flash  # type: ignore[attr-defined]
