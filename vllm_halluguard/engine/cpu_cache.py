"""Reading and writing vLLM's CPU paged KV cache from torch.

The CPU backend stores each layer's cache as ``[num_blocks, num_kv_heads, 2 * block_size, head_size]``
(K rows of the block, then V rows) but packs the inside of each page for its SIMD kernels (with the
``vec`` ISA the K half is head-dim-major). Rather than hard-coding each ISA's packing, the layout is
*learned* once by writing probe values through vLLM's own ``cpu_attn_reshape_and_cache`` op; writes
always go through that op, so the packing stays vLLM's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageLayout:
    """Flat offsets, inside one (block, kv-head) page half, of token ``t`` and dim ``d``: ``[bs, hs]``.

    ``k_order``/``v_order`` name the common packings so reads can use strided views instead of a
    gather: ``"token"`` (``[bs, hs]``), ``"dim"`` (``[hs, bs]``) or ``"other"``.
    """

    k_index: torch.Tensor
    v_index: torch.Tensor
    k_order: str = "other"
    v_order: str = "other"


def _order(index: torch.Tensor) -> str:
    bs, hs = index.shape
    flat = torch.arange(bs * hs)
    if torch.equal(index, flat.view(bs, hs)):
        return "token"
    if torch.equal(index, flat.view(hs, bs).T):
        return "dim"
    return "other"


def _write(key, value, kv_cache, slots, isa: str, kv_cache_dtype: str = "auto") -> None:
    from vllm import _custom_ops as ops

    nb, hkv, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slots, isa, kv_cache_dtype=kv_cache_dtype
    )


@functools.lru_cache(maxsize=16)
def learn_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> PageLayout:
    """Probe the packing of ``isa`` with token and dim indices (exact in any float dtype up to 256)."""
    if max(block_size, head_size) > 256 and dtype != torch.float32:
        raise NotImplementedError(f"layout probe needs block and head size <= 256 for {dtype}")
    cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
    slots = torch.arange(block_size, dtype=torch.int64)
    indices = []
    for axis in (0, 1):  # 0: which token, 1: which dim
        grid = (
            torch.arange(1, block_size + 1)[:, None] if axis == 0 else torch.arange(1, head_size + 1)[None, :]
        )
        probe = grid.expand(block_size, head_size).to(dtype).unsqueeze(1).contiguous()
        cache.zero_()
        _write(probe, probe, cache, slots, isa)
        halves = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        indices.append([h.reshape(-1).round().long() - 1 for h in halves])
    (k_tok, v_tok), (k_dim, v_dim) = indices
    out = []
    for tok, dim in ((k_tok, k_dim), (v_tok, v_dim)):
        index = torch.full((block_size, head_size), -1, dtype=torch.long)
        index[tok, dim] = torch.arange(tok.numel())
        if (index < 0).any():
            raise RuntimeError(f"could not learn the {isa} KV page layout")
        out.append(index)
    return PageLayout(out[0], out[1], _order(out[0]), _order(out[1]))


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, layout: PageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ``seq_len`` positions: ``[seq_len, num_kv_heads, head_size]`` each."""
    hkv, bs = kv_cache.shape[1:3]
    hs = layout.k_index.shape[1]
    n_blocks = -(-seq_len // bs)
    pages = kv_cache.index_select(0, block_ids[:n_blocks].long()).view(n_blocks, hkv, 2, bs * hs)
    halves = []
    for half, index, order in ((0, layout.k_index, layout.k_order), (1, layout.v_index, layout.v_order)):
        flat = pages[:, :, half]
        if order == "token":
            x = flat.view(n_blocks, hkv, bs, hs)
        elif order == "dim":
            x = flat.view(n_blocks, hkv, hs, bs).transpose(2, 3)
        else:
            x = flat[..., index.flatten()].view(n_blocks, hkv, bs, hs)
        halves.append(x.permute(0, 2, 1, 3).reshape(n_blocks * bs, hkv, hs)[:seq_len])
    return halves[0], halves[1]


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
    kv_cache_dtype="auto",
) -> None:
    """Write ``key, value [n, num_kv_heads, head_size]`` into ``slots [n]`` with vLLM's packing op."""
    _write(key.contiguous(), value.contiguous(), kv_cache, slots.to(torch.int64), isa, kv_cache_dtype)


def gather_kv_batched(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    rows: list[int],
    seq_lens: list[int],
    layout: PageLayout,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """K and V of several sequences in one gather, padded to the longest: ``[B, S_max, Hkv, hs]`` each.

    ``rows`` index ``block_table [num_reqs, max_blocks]``; sequence ``b`` holds ``seq_lens[b]`` tokens.
    Also returns ``valid [B, S_max]`` (bool, position ``< seq_len``); padded positions are zero.
    ``values=False`` reads only the K half of the pages and returns ``None`` for V.
    """
    bs = kv_cache.shape[2]
    s_max = max(seq_lens)
    lens = torch.tensor(seq_lens)
    ids, valid = page_ids(block_table[rows], lens, s_max, bs)
    padded = bool((lens < s_max).any())
    halves = read_pages(kv_cache, ids, s_max, layout, 2 if values else 1)
    if padded:
        halves = [x.masked_fill(~valid[:, :, None, None], 0) for x in halves]
    return halves[0], halves[1] if values else None, valid


def page_ids(
    block_table: torch.Tensor, lens: torch.Tensor, s_max: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks ``[B, n_blocks]`` that hold rows of lengths ``lens [B]`` (``block_table``: the rows'
    tables) padded to ``s_max`` (entries past a row's blocks may be stale: its first block is read
    instead), and ``valid [B, s_max]`` (position ``< len``). Built once per step, read by every layer."""
    n_blocks = -(-s_max // block_size)
    device = block_table.device
    ids = block_table[:, :n_blocks].long()
    used = torch.arange(n_blocks, device=device)[None, :] * block_size < lens[:, None]
    ids = torch.where(used, ids, ids[:, :1])
    valid = torch.arange(s_max, device=device)[None, :] < lens[:, None]
    return ids, valid


def read_pages(
    kv_cache: torch.Tensor, ids: torch.Tensor, s_max: int, layout: PageLayout, halves: int = 2
) -> list[torch.Tensor]:
    """K (and V, ``halves=2``) of the pages ``ids [B, n_blocks]`` (:func:`page_ids`) as ``[B, s_max, Hkv,
    hs]``; positions past a row's length hold whatever its pages hold (mask them with ``valid``)."""
    hkv, bs = kv_cache.shape[1:3]
    hs = layout.k_index.shape[1]
    b, n_blocks = ids.shape
    pages = kv_cache.view(-1, hkv, 2, bs * hs)[:, :, :halves].index_select(0, ids.flatten())
    pages = pages.view(b, n_blocks, hkv, halves, bs * hs)
    out = []
    specs = ((0, layout.k_index, layout.k_order), (1, layout.v_index, layout.v_order))[:halves]
    for half, index, order in specs:
        flat = pages[:, :, :, half]
        if order == "token":
            x = flat.view(b, n_blocks, hkv, bs, hs)
        elif order == "dim":
            x = flat.view(b, n_blocks, hkv, hs, bs).transpose(3, 4)
        else:
            x = flat[..., index.flatten()].view(b, n_blocks, hkv, bs, hs)
        out.append(x.permute(0, 1, 3, 2, 4).reshape(b, n_blocks * bs, hkv, hs)[:, :s_max])
    return out


def gather_slots(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    rows: list[int],
    positions: torch.Tensor,
    layout: PageLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V at ``positions [B, P]`` of sequences ``rows``: ``[B, P, Hkv, hs]`` each (a few slots
    per row, without reading the rest of their pages)."""
    bs = kv_cache.shape[2]
    blocks = block_table[rows].long().gather(1, positions // bs)  # [B, P]
    return read_at(kv_cache, blocks, positions % bs, layout)


def read_at(
    kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, layout: PageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V at cache ``blocks`` and in-block ``offsets`` (same shape ``[...]``): ``[..., Hkv, hs]``."""
    hkv, bs = kv_cache.shape[1:3]
    pages = kv_cache.view(-1, hkv, 2, bs * layout.k_index.shape[1])[blocks]  # [..., Hkv, 2, bs * hs]
    out = []
    for half, index in ((0, layout.k_index), (1, layout.v_index)):
        flat = index[offsets]  # [..., hs] offsets of the slot's dims inside the page half
        out.append(pages[..., half, :].gather(-1, flat.unsqueeze(-2).expand(*flat.shape[:-1], hkv, -1)))
    return out[0], out[1]
