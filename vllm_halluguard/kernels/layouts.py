"""K and V views ``[num_blocks, block_size, Hkv, D]`` of the paged KV caches the kernel reads.

The kernel takes K and V as two strided tensors, so every layout below is read in place (views,
no copy):

* ``"flash"``: FlashAttention's own ``[2, NB, BS, Hkv, D]`` (what ``flash_attn`` takes; vLLM before
  0.32 handed it to its FLASH_ATTN impl);
* ``"triton"``: ``[NB, 2, BS, Hkv, D]`` (vLLM's TRITON_ATTN before 0.32);
* ``"hnd2d"``: ``[NB, Hkv, BS, 2 D]`` (K in the first ``D`` channels): the per-layer view vLLM 0.32
  hands FLASH_ATTN and TRITON_ATTN (any physical stride order); vLLM's CPU backend has this logical
  shape but packs each page, see :mod:`vllm_halluguard.engine.cache_io`.
"""

from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["flash", "triton", "hnd2d"]
LAYOUTS: tuple[Layout, ...] = ("flash", "triton", "hnd2d")


def split_kv(kv_cache: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_cache, v_cache)`` views ``[NB, BS, Hkv, D]`` of one layer's ``kv_cache`` in ``layout``."""
    if layout == "flash":
        if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
            raise ValueError(f"flash layout is [2, NB, BS, Hkv, D], got {tuple(kv_cache.shape)}")
        return kv_cache[0], kv_cache[1]
    if layout == "triton":
        if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
            raise ValueError(f"triton layout is [NB, 2, BS, Hkv, D], got {tuple(kv_cache.shape)}")
        return kv_cache[:, 0], kv_cache[:, 1]
    if layout == "hnd2d":
        if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
            raise ValueError(f"hnd2d layout is [NB, Hkv, BS, 2D], got {tuple(kv_cache.shape)}")
        d = kv_cache.shape[-1] // 2
        return kv_cache[..., :d].permute(0, 2, 1, 3), kv_cache[..., d:].permute(0, 2, 1, 3)
    raise ValueError(f"unknown cache layout {layout!r}; expected one of {LAYOUTS}")


def allocate_kv_cache(
    layout: Layout,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fill: float = 0.0,
) -> torch.Tensor:
    """A ``kv_cache`` tensor in ``layout`` (for tests and benchmarks), filled with ``fill``."""
    shape = {
        "flash": (2, num_blocks, block_size, num_kv_heads, head_size),
        "triton": (num_blocks, 2, block_size, num_kv_heads, head_size),
        "hnd2d": (num_blocks, num_kv_heads, block_size, 2 * head_size),
    }
    if layout not in shape:
        raise ValueError(f"unknown cache layout {layout!r}; expected one of {LAYOUTS}")
    return torch.full(shape[layout], fill, dtype=dtype, device=device)
