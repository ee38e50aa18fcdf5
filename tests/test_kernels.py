"""Paged attention: Triton kernel vs the paged torch reference vs dense rows.

Without CUDA the kernel runs in Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by
tests/conftest.py before anything imports Triton); with CUDA it runs compiled on the GPU. Each batch keeps its
per-sequence K/V, scatters them into a shuffled paged cache (vLLM's Triton layout
``[num_blocks, 2, block_size, Hkv, D]``, so K and V are strided views) whose unused slots hold NaN,
and mixes chunked prefill, full prefill, decode and an empty (padded) sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_halluguard.kernels import triton_attention as TA
from vllm_halluguard.kernels.paged import paged_attention_ref, write_kv
from vllm_halluguard.kernels.reference import attention_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before anything imports triton.
assert DEVICE == "cuda" or TA.INTERPRETED, "run through pytest (conftest) or set TRITON_INTERPRET=1"
NEG_INF = float("-inf")
# (query_len, seq_len): chunked prefill, decode at position 0, decode, full prefill (two query tiles),
# padded request with no rows, decode.
SHAPES = ((7, 45), (1, 1), (1, 70), (40, 40), (0, 9), (1, 33))


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scale: float
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], as written
    values: list[torch.Tensor]

    def args(self, device: str = "cpu") -> tuple:
        tensors = (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_table)
        return (*(x.to(device) for x in tensors), self.scale)


def make_batch(
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    hq: int = 4,
    hkv: int = 2,
    seed: int = 0,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for _, s in shapes) + 1  # one spare column, never read
    num_blocks = len(shapes) * max_blocks + 3
    cache = torch.full((num_blocks, 2, block_size, hkv, head_size), float("nan"), dtype=dtype)
    k_cache, v_cache = cache[:, 0], cache[:, 1]
    block_table = torch.randperm(num_blocks, generator=g)[: len(shapes) * max_blocks]
    block_table = block_table.view(len(shapes), max_blocks).to(torch.int32)
    keys, values = [], []
    for b, (_, s) in enumerate(shapes):
        k = torch.randn(s, hkv, head_size, generator=g).to(dtype)
        v = torch.randn(s, hkv, head_size, generator=g).to(dtype)
        pos = torch.arange(s)
        slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
        write_kv(k_cache, v_cache, k, v, slots)
        keys.append(k)
        values.append(v)
    qlens = torch.tensor([ql for ql, _ in shapes])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), qlens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(qlens.sum()), hq, head_size, generator=g).to(dtype)
    seq_lens = torch.tensor([s for _, s in shapes], dtype=torch.int32)
    scale = 1.5 / head_size**0.5  # a little sharper than usual, so entropies spread out
    return Batch(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale, keys, values)


def make_sinks(batch: Batch, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sinks = torch.randn(batch.q.shape[:2], generator=g) * 2
    sinks[torch.rand(sinks.shape, generator=g) < 0.5] = NEG_INF
    return sinks


def make_key_mask(batch: Batch, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    width = batch.block_table.shape[1] * batch.k_cache.shape[1]
    mask = torch.rand(len(batch.keys), width, generator=g) < 0.7
    mask[:, 0] = True  # every row keeps a key
    return mask


def run_triton(
    batch: Batch,
    sinks: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    return_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The Triton kernel on DEVICE, results back on CPU."""
    results = TA.paged_attention(
        *batch.args(DEVICE),
        sinks=None if sinks is None else sinks.to(DEVICE),
        key_mask=None if key_mask is None else key_mask.to(DEVICE),
        return_stats=return_stats,
    )
    out, lse, ent = (None if x is None else x.cpu() for x in results)
    return out, lse, ent


def dense_expected(batch: Batch, sinks: torch.Tensor | None, key_mask: torch.Tensor | None):
    """attention_rows on each sequence's original K/V (no cache involved)."""
    outs, lses, ents = [], [], []
    starts = batch.query_start_loc.tolist()
    for b, (k, v) in enumerate(zip(batch.keys, batch.values, strict=True)):
        lo, hi = starts[b], starts[b + 1]
        s = k.shape[0]
        if hi == lo:
            continue
        o, lse, ent = attention_rows(
            batch.q[lo:hi],
            k,
            v,
            batch.scale,
            torch.arange(s - (hi - lo), s),
            sink=None if sinks is None else sinks[lo:hi],
            key_mask=None if key_mask is None else key_mask[b, :s],
        )
        outs.append(o)
        lses.append(lse)
        ents.append(ent)
    return torch.cat(outs), torch.cat(lses), torch.cat(ents)


CASES = [
    pytest.param(32, 16, torch.float32, id="d32-bs16-fp32"),
    pytest.param(64, 32, torch.float32, id="d64-bs32-fp32"),
    pytest.param(64, 16, torch.bfloat16, id="d64-bs16-bf16"),
    pytest.param(32, 32, torch.float16, id="d32-bs32-fp16"),
]
TOL = {
    torch.float32: {"out": 1e-5, "stat": 1e-5},
    torch.bfloat16: {"out": 2e-2, "stat": 1e-4},
    torch.float16: {"out": 3e-3, "stat": 1e-4},
}


@pytest.mark.parametrize(("head_size", "block_size", "dtype"), CASES)
@pytest.mark.parametrize("features", ["plain", "sinks+mask"])
def test_triton_matches_paged_and_dense_reference(head_size, block_size, dtype, features):
    batch = make_batch(head_size, block_size, dtype)
    sinks = make_sinks(batch) if features != "plain" else None
    key_mask = make_key_mask(batch) if features != "plain" else None
    out, lse, ent = run_triton(batch, sinks, key_mask)
    ref_out, ref_lse, ref_ent = paged_attention_ref(
        *batch.args(), sinks=sinks, key_mask=key_mask, return_stats=True
    )
    dense_out, dense_lse, dense_ent = dense_expected(batch, sinks, key_mask)
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == ent.dtype == torch.float32
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(ref_out, dense_out, rtol=0, atol=1e-6)  # paging is pure indexing
    torch.testing.assert_close(ref_lse, dense_lse, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref_ent, dense_ent, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=tol["out"])
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol["stat"])
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=tol["stat"])


def explicit_logits(batch: Batch, key_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per sequence ``[q_len, Hq, S]`` fp32 logits with -inf where a key is not visible."""
    starts = batch.query_start_loc.tolist()
    hq = batch.q.shape[1]
    result = []
    for b, k in enumerate(batch.keys):
        lo, hi = starts[b], starts[b + 1]
        s = k.shape[0]
        k_per_head = k.float().repeat_interleave(hq // k.shape[1], dim=1)  # [S, Hq, D]
        logits = torch.einsum("qhd,shd->qhs", batch.q[lo:hi].float(), k_per_head) * batch.scale
        pos = torch.arange(s - (hi - lo), s)
        visible = torch.arange(s)[None, :] <= pos[:, None]
        if key_mask is not None:
            visible = visible & key_mask[b, :s][None, :]
        result.append(logits.masked_fill(~visible[:, None, :], NEG_INF))
    return result


def test_stats_equal_explicit_logsumexp_and_entropy():
    batch = make_batch(32, 16)
    key_mask = make_key_mask(batch)
    _, lse, ent = run_triton(batch, make_sinks(batch), key_mask)
    logits = explicit_logits(batch, key_mask)
    expected_lse = torch.cat([torch.logsumexp(x, dim=-1) for x in logits])
    expected_ent = torch.cat(
        [-(torch.softmax(x, -1) * torch.log_softmax(x, -1).nan_to_num(neginf=0.0)).sum(-1) for x in logits]
    )
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, expected_ent, rtol=0, atol=1e-5)
    assert ent[7].abs().max() < 1e-6  # sequence 1 (query_len 1, seq_len 1): one key, entropy 0
    assert (ent > 0.1).float().mean() > 0.5  # most rows are far from one-hot


def test_sink_drops_mass():
    batch = make_batch(32, 16)
    batch.v_cache.fill_(1.0)  # out = kept attention mass, per row and head
    sinks = make_sinks(batch)
    out, _, _ = run_triton(batch, sinks)
    mass = out[..., 0]
    torch.testing.assert_close(out, mass[..., None].expand_as(out), rtol=0, atol=1e-7)
    has_sink = torch.isfinite(sinks)
    assert (mass[has_sink] < 1).all() and (mass[has_sink] > 0).all()
    torch.testing.assert_close(mass[~has_sink], torch.ones_like(mass[~has_sink]), rtol=0, atol=1e-6)
    lse = torch.cat([torch.logsumexp(x, dim=-1) for x in explicit_logits(batch, None)])
    expected = torch.exp(lse) / (torch.exp(lse) + torch.exp(sinks))
    torch.testing.assert_close(mass, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_sinks_are_bitwise_plain(dtype):
    batch = make_batch(32, 16, dtype)
    key_mask = make_key_mask(batch)
    no_sinks = torch.full(batch.q.shape[:2], NEG_INF)
    plain = run_triton(batch, None, key_mask)
    with_sinks = run_triton(batch, no_sinks, key_mask)
    for a, b in zip(plain, with_sinks, strict=True):
        assert torch.equal(a, b)
    out_only, no_lse, no_ent = run_triton(batch, None, key_mask, return_stats=False)
    assert no_lse is None and no_ent is None
    assert torch.equal(out_only, plain[0])


@pytest.mark.parametrize(("block_m", "tile_n"), [(16, 16), (32, 64)])
def test_launch_configs_agree(block_m, tile_n):
    """Tiles smaller than a page, several query tiles per sequence, GQA group 4."""
    batch = make_batch(32, 32, hq=8, hkv=2, shapes=((1, 50), (23, 60), (1, 3)))
    sinks, key_mask = make_sinks(batch), make_key_mask(batch)
    ref = paged_attention_ref(*batch.args(), sinks=sinks, key_mask=key_mask, return_stats=True)
    out = torch.empty_like(batch.q, device=DEVICE)
    lse = torch.empty(batch.q.shape[:2], device=DEVICE)
    ent = torch.empty_like(lse)
    TA.paged_attention_into(
        out,
        lse,
        ent,
        *batch.args(DEVICE),
        sinks.to(DEVICE),
        key_mask.to(DEVICE),
        block_m=block_m,
        tile_n=tile_n,
    )
    for got, want in zip((out, lse, ent), ref, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)


def test_strided_inputs():
    """Views the engine may pass: q split from a fused qkv, a per-head sink broadcast over rows
    (stride 0), a key mask and a block table that are slices of wider persistent buffers."""
    batch = make_batch(32, 16, shapes=((5, 30), (1, 21)))
    t, hq, d = batch.q.shape
    qkv = torch.randn(t, (hq + 4) * d)
    qkv[:, : hq * d] = batch.q.reshape(t, -1)
    per_head = torch.tensor([0.5, NEG_INF, -1.0, 2.0])
    sinks_view = per_head[None, :].expand(t, hq)
    key_mask = make_key_mask(batch)
    mask_wide = torch.zeros(key_mask.shape[0], 2 * key_mask.shape[1], dtype=torch.bool)
    mask_wide[:, ::2] = key_mask
    table_wide = torch.full((2, batch.block_table.shape[1] + 5), -7, dtype=torch.int32)
    table_wide[:, : batch.block_table.shape[1]] = batch.block_table
    want = paged_attention_ref(
        *batch.args(), sinks=sinks_view.contiguous(), key_mask=key_mask, return_stats=True
    )
    _, k_cache, v_cache, qsl, seq_lens, _, scale = batch.args(DEVICE)
    got = TA.paged_attention(
        qkv.to(DEVICE)[:, : hq * d].view(t, hq, d),
        k_cache,
        v_cache,
        qsl,
        seq_lens,
        table_wide.to(DEVICE)[:, : batch.block_table.shape[1]],
        scale,
        sinks=per_head.to(DEVICE)[None, :].expand(t, hq),
        key_mask=mask_wide.to(DEVICE)[:, ::2],
        return_stats=True,
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-5)


def test_no_gqa_and_empty_batch():
    batch = make_batch(32, 16, hq=2, hkv=2, shapes=((3, 20), (1, 17)))
    got = run_triton(batch)
    want = paged_attention_ref(*batch.args(), return_stats=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    _, k_cache, v_cache, _, seq_lens, block_table, _ = batch.args(DEVICE)
    empty_q = batch.q[:0].to(DEVICE)
    qsl = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, _, _ = TA.paged_attention(empty_q, k_cache, v_cache, qsl, seq_lens, block_table, 1.0)
    assert out.shape == (0, 2, 32)


def test_bad_arguments_are_rejected():
    batch = make_batch(32, 16, shapes=((1, 5),))
    with pytest.raises(ValueError, match="sinks"):
        TA.paged_attention(*batch.args(), sinks=torch.zeros(1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="key_mask"):
        TA.paged_attention(*batch.args(), key_mask=torch.ones(1, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        TA.paged_attention(batch.q.half(), *batch.args()[1:])


def test_write_kv_skips_padding_slots():
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros(3, 4, 1, 2)
    key = torch.arange(1.0, 7.0).view(3, 1, 2)
    write_kv(k_cache, v_cache, key, -key, torch.tensor([9, -1, 2]))
    assert torch.equal(k_cache[2, 1, 0], key[0, 0]) and torch.equal(v_cache[0, 2, 0], -key[2, 0])
    assert k_cache.count_nonzero() == 4  # 9 -> (2, 1), 2 -> (0, 2); the -1 row went nowhere
