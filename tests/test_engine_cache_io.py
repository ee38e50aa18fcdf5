"""Each native backend's cache read and written through :mod:`vllm_halluguard.engine.cache_io`:
what a method writes is what every read (one row, padded rows, single slots, the kernel's views)
returns, for FlashAttention's and vLLM Triton's layouts and CPU_ATTN's packed pages."""

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
    layout = {"FLASH_ATTN": "flash", "TRITON_ATTN": "triton"}[backend]
    return allocate_kv_cache(layout, nb, BS, HKV, D, torch.float32, fill=7.0)


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
