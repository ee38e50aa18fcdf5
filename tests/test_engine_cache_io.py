"""Each native backend's cache read and written through :mod:`vllm_halluguard.engine.cache_io`:
what a method writes is what every read (one row, padded rows, single slots, the kernel's views)
returns, for the per-layer view vLLM gives FLASH_ATTN and TRITON_ATTN and CPU_ATTN's packed pages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_halluguard.engine.cache_io import cache_io
from vllm_halluguard.kernels.layouts import allocate_kv_cache

HKV, D, BS = 2, 32, 32
SEQ = [70, 5, 33]


def _cache(backend: str, nb: int) -> torch.Tensor:
    if backend == "CPU_ATTN":
        return torch.randn(nb, HKV, BS, 2 * D)  # junk around the written tokens
    return allocate_kv_cache("hnd2d", nb, BS, HKV, D, torch.float32, fill=7.0)  # vLLM 0.32's view


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN"])
def test_writes_come_back_from_every_read(backend):
    g = torch.Generator().manual_seed(4)
    need = [-(-n // BS) for n in SEQ]
    nb = sum(need) + 2
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(SEQ), max(need) + 1, dtype=torch.int32)
    off = 0
    for r, m in enumerate(need):
        table[r, :m] = perm[off : off + m].to(torch.int32)
        off += m
    io = cache_io(
        backend,
        _cache(backend, nb),
        table,
        SimpleNamespace(isa="vec"),
        SimpleNamespace(kv_cache_dtype="auto"),
    )
    keys, values = [], []
    for r, n in enumerate(SEQ):
        pos = torch.arange(n)
        slots = table[r].long()[pos // BS] * BS + pos % BS
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        io.write(slots, k, v)
        keys.append(k)
        values.append(v)
    for r, n in enumerate(SEQ):
        k, v = io.gather(r, n)
        assert torch.equal(k, keys[r]) and torch.equal(v, values[r])
    rows = [2, 0]
    k, v, valid = io.gather_batch(rows, [SEQ[r] for r in rows])
    for b, r in enumerate(rows):
        n = SEQ[r]
        assert torch.equal(k[b, :n], keys[r]) and torch.equal(v[b, :n], values[r])
        assert valid[b].sum() == n and not k[b, n:].any()
    positions = torch.tensor([[32, 0], [69, 31]])
    ks, vs = io.gather_slots(rows, positions)
    for b, r in enumerate(rows):
        assert torch.equal(ks[b], keys[r][positions[b]]) and torch.equal(vs[b], values[r][positions[b]])
    views = io.kernel_views()
    assert views is not None, "the vec ISA's fp32 pages are plain token- or dim-major pages"
    kc, vc = views
    for r, n in enumerate(SEQ):
        pos = torch.arange(n)
        blocks, offsets = table[r].long()[pos // BS], pos % BS
        assert torch.equal(kc[blocks, offsets], keys[r]) and torch.equal(vc[blocks, offsets], values[r])


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_backends_are_read_through_vllms_own_per_layer_view(backend, layout):
    """vLLM 0.32 gives FLASH_ATTN and TRITON_ATTN impls ``[NB, Hkv, BS, 2D]`` views of its raw cache
    and splits them as ``kv_cache.transpose(1, 2).split(D, -1)``; what the plugin writes, their split
    reads (for both physical layouts vLLM allocates)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    nb = 6
    raw = torch.zeros(spec.page_size_bytes * nb, dtype=torch.int8)
    tensor = KVCacheTensor(
        size=raw.numel(), layers=["l0"], layer_stride=raw.numel(), block_stride=spec.page_size_bytes
    )
    physical = KVCacheLayout.LBNHC if layout == "NHD" else KVCacheLayout.LBHNC
    (view,) = create_kv_cache_views(raw, spec, nb, physical, tensor)
    table = torch.tensor([[4, 1, 3]], dtype=torch.int32)
    io = cache_io(backend, view, table, None, None)
    g = torch.Generator().manual_seed(5)
    n = 70
    k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
    pos = torch.arange(n)
    io.write(table[0].long()[pos // BS] * BS + pos % BS, k, v)
    key_cache, value_cache = view.transpose(1, 2).split(D, dim=-1)  # as vLLM's impls read it
    blocks, offsets = table[0].long()[pos // BS], pos % BS
    assert torch.equal(key_cache[blocks, offsets], k) and torch.equal(value_cache[blocks, offsets], v)
    kg, vg = io.gather(0, n)
    assert torch.equal(kg, k) and torch.equal(vg, v)
