"""The learned CPU page layout reads back exactly what vLLM's packing op wrote."""

import pytest
import torch

from vllm_halluguard.engine.cpu_cache import gather_kv, learn_layout, write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [32, 64])
def test_gather_reads_back_packed_cache(dtype, head_size):
    bs, hkv, nb = 32, 2, 6
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(nb, hkv, bs, 2 * head_size, dtype=dtype)
    blocks = torch.tensor([4, 1, 3])  # non-contiguous block table
    seq_len = 70  # spans 3 blocks, the last one partly
    key = torch.randn(seq_len, hkv, head_size, generator=g).to(dtype)
    value = torch.randn(seq_len, hkv, head_size, generator=g).to(dtype)
    pos = torch.arange(seq_len)
    slots = blocks[pos // bs] * bs + pos % bs
    write_kv(cache, key, value, slots, "vec")
    k, v = gather_kv(cache, blocks, seq_len, learn_layout("vec", dtype, bs, head_size))
    assert torch.equal(k, key) and torch.equal(v, value)
    # a single-slot overwrite lands exactly there
    write_kv(cache, key[:1] * 0 + 7, value[:1] * 0 - 7, slots[40:41], "vec")
    k2, v2 = gather_kv(cache, blocks, seq_len, learn_layout("vec", dtype, bs, head_size))
    assert (k2[40] == 7).all() and (v2[40] == -7).all()
    keep = torch.ones(seq_len, dtype=torch.bool)
    keep[40] = False
    assert torch.equal(k2[keep], key[keep]) and torch.equal(v2[keep], value[keep])
