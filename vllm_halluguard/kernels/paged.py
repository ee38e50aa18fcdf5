"""Torch reference for attention over a paged KV cache, and the cache write it reads from.

Layouts (the contract :func:`vllm_halluguard.kernels.triton_attention.paged_attention` shares):

* ``k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_size]``; token ``j`` of sequence
  ``b`` lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``.
* A varlen batch of ``B`` sequences: ``q [T, Hq, D]`` holds sequence ``b``'s query rows at
  ``query_start_loc[b] : query_start_loc[b + 1]``. Row ``i`` of a sequence with query length ``q``
  and ``seq_lens[b] = s`` (keys already written, the rows' own included) sits at absolute position
  ``s - q + i`` and attends causally to keys ``0 .. s - q + i``. Prefill rows (``q > 1``) and
  decode rows (``q == 1``) mix freely.
* ``sinks [T, Hq]`` (fp32, ``-inf`` = none): a per-row, per-head logit whose value vector is zero
  (its mass is dropped). ``key_mask [B, >= max seq_len]`` (bool, False = key removed).
* Returns ``out [T, Hq, D]`` in ``q``'s dtype and, with ``return_stats``, the fp32 ``lse`` and
  ``entropy [T, Hq]`` of the plain row (real, unmasked keys only; the sink excluded).
"""

from __future__ import annotations

import torch

from vllm_halluguard.kernels.reference import attention_rows


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key, value [N, Hkv, D]`` at ``slot = block * block_size + offset`` (in place).

    Negative slots (vLLM's padding) are skipped. Works on strided cache views.
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` keys and values ``[seq_len, Hkv, D]`` of one sequence's block row."""
    block_size = k_cache.shape[1]
    blocks = block_row[: -(-seq_len // block_size)].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def gather_keys(k_cache: torch.Tensor, block_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """K ``[B, P, Hkv, D]`` at ``positions [B, P]`` of the sequences whose block rows are ``block_rows
    [B, max_blocks]``: only those ``B * P`` keys are read (no V, no other key). Works on strided views;
    every index stays on the cache's device (no host round trip)."""
    block_size = k_cache.shape[1]
    positions = positions.long()
    blocks = block_rows.long().gather(1, torch.div(positions, block_size, rounding_mode="floor"))
    return k_cache[blocks, positions % block_size]


def paged_attention_ref(
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
    """Varlen causal attention over the paged cache, one :func:`attention_rows` call per sequence.

    See the module docstring for layouts. Slow (host loop); the oracle for the Triton kernel.
    """
    t, hq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device) if return_stats else None
    entropy = torch.empty_like(lse) if lse is not None else None
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k, v = gather_kv(k_cache, v_cache, block_table[b], seq_len)
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        o, row_lse, row_entropy = attention_rows(
            q[lo:hi],
            k,
            v,
            scale,
            q_pos,
            sink=None if sinks is None else sinks[lo:hi],
            key_mask=None if key_mask is None else key_mask[b, :seq_len],
        )
        out[lo:hi] = o
        if lse is not None and entropy is not None:
            lse[lo:hi] = row_lse
            entropy[lo:hi] = row_entropy
    return out, lse, entropy
