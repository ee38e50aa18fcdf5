"""Paged attention: Triton kernel vs the paged torch reference vs dense rows.

Without CUDA the kernel runs in Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by
tests/conftest.py before anything imports Triton); with CUDA it runs compiled on the GPU. Each batch keeps its
per-sequence K/V, scatters them into a shuffled paged cache (vLLM's Triton layout
``[num_blocks, 2, block_size, Hkv, D]`` unless a test picks FlashAttention's or the plugin's, so K
and V are strided views) whose unused slots hold NaN, and mixes chunked prefill, full prefill,
decode and an empty (padded) sequence. Split-KV runs are forced with ``num_splits`` and use key
tiles smaller than a page, so segment boundaries cut pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_halluguard.kernels import triton_attention as TA
from vllm_halluguard.kernels.layouts import LAYOUTS, allocate_kv_cache, split_kv
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
    layout: str = "triton",
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for _, s in shapes) + 1  # one spare column, never read
    num_blocks = len(shapes) * max_blocks + 3
    cache = allocate_kv_cache(layout, num_blocks, block_size, hkv, head_size, dtype, fill=float("nan"))
    k_cache, v_cache = split_kv(cache, layout)
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
    **launch: object,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The Triton kernel on DEVICE, results back on CPU."""
    results = TA.paged_attention(
        *batch.args(DEVICE),
        sinks=None if sinks is None else sinks.to(DEVICE),
        key_mask=None if key_mask is None else key_mask.to(DEVICE),
        return_stats=return_stats,
        **launch,
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


# -- split-KV, the merge, the K-only pass, launch paths and cache layouts ------------------------

# Mixed batch for split-KV: chunked prefill (two query tiles at block_m 16 / group 4), decodes of
# several lengths (one shorter than a tile, so most of its segments are empty), a padded sequence.
SPLIT_SHAPES = ((5, 70), (1, 3), (1, 50), (0, 9), (1, 97))


def segment_bounds(kv_end: int, num_splits: int, tile_n: int) -> list[tuple[int, int]]:
    """The module docstring's segments of keys ``[0, kv_end)``."""
    per_split = -(-kv_end // num_splits)
    seg = -(-per_split // tile_n) * tile_n
    return [(s * seg, min((s + 1) * seg, kv_end)) for s in range(num_splits)]


def assert_matches(got, want, atol: float = 1e-5) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=atol)


@pytest.mark.parametrize("num_splits", [3, 7, 16])
@pytest.mark.parametrize("features", ["plain", "sinks+mask"])
def test_split_kv_matches_reference(num_splits, features):
    batch = make_batch(32, 32, shapes=SPLIT_SHAPES, hq=8, hkv=2)
    # The decode of 97 keys, tiles of 16 keys in pages of 32: some segment boundary cuts a page.
    cuts = [lo for lo, hi in segment_bounds(97, num_splits, 16) if lo < hi and lo % 32]
    assert cuts
    sinks = make_sinks(batch) if features != "plain" else None
    key_mask = make_key_mask(batch) if features != "plain" else None
    got = run_triton(batch, sinks, key_mask, num_splits=num_splits, tile_n=16, block_m=16)
    want = dense_expected(batch, sinks, key_mask)
    assert_matches(got, want)


def test_every_split_count_matches_reference():
    """The split count is a runtime argument (one compiled kernel for all counts > 1): each count the
    automatic choice can pick, 1 .. MAX_SPLITS, gives the reference's rows."""
    batch = make_batch(16, 32, shapes=((1, 97), (2, 21)), hq=2, hkv=1)
    sinks, key_mask = make_sinks(batch), make_key_mask(batch)
    want = dense_expected(batch, sinks, key_mask)
    for num_splits in range(1, TA.MAX_SPLITS + 1):
        assert_matches(run_triton(batch, sinks, key_mask, num_splits=num_splits, tile_n=16), want)


def test_split_kv_bf16_and_gqa_group_not_power_of_two():
    batch = make_batch(64, 16, torch.bfloat16, shapes=((1, 40), (3, 33)), hq=6, hkv=2)
    sinks, key_mask = make_sinks(batch), make_key_mask(batch)
    got = run_triton(batch, sinks, key_mask, num_splits=4)
    one = run_triton(batch, sinks, key_mask, num_splits=1)
    want = dense_expected(batch, sinks, key_mask)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(got[0].float(), one[0].float(), rtol=0, atol=2e-2)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_merge_with_masked_segments_and_sinks():
    """Whole segments masked out (empty partials beside full ones), large logits (the re-shift of
    ``t`` matters), sinks on every row: the merged entropy and LSE equal the explicit ones."""
    batch = make_batch(32, 32, shapes=((1, 96), (2, 64)), hq=4, hkv=2)
    batch.q.mul_(4.0)  # logits of tens: m differs a lot between segments
    key_mask = torch.ones(2, batch.block_table.shape[1] * 32, dtype=torch.bool)
    key_mask[0, 16:64] = False  # segments [16, 32) and [32, 48), [48, 64) of 6 x 16 are empty
    key_mask[1, 40:] = False
    sinks = torch.randn(batch.q.shape[:2])
    got = run_triton(batch, sinks, key_mask, num_splits=6, tile_n=16)
    want = dense_expected(batch, sinks, key_mask)
    assert_matches(got, want, atol=3e-5)
    logits = explicit_logits(batch, key_mask)
    ent = torch.cat(
        [-(torch.softmax(x, -1) * torch.log_softmax(x, -1).nan_to_num(neginf=0.0)).sum(-1) for x in logits]
    )
    torch.testing.assert_close(got[2], ent, rtol=0, atol=3e-5)
    assert got[2].max() > 0.5  # not one-hot rows, so a wrong t would show


def test_masked_tile_skip_is_exact():
    batch = make_batch(32, 16, shapes=((1, 80), (4, 64)), hq=4, hkv=2)
    key_mask = make_key_mask(batch)
    key_mask[:, 16:48] = False  # two whole tiles of 16 skipped
    sinks = make_sinks(batch)
    for splits in (1, 3):
        skipped = run_triton(batch, sinks, key_mask, num_splits=splits, tile_n=16)
        full = run_triton(batch, sinks, key_mask, num_splits=splits, tile_n=16, skip_masked_tiles=False)
        for a, b in zip(skipped, full, strict=True):
            assert torch.equal(a, b)
        assert_matches(skipped, dense_expected(batch, sinks, key_mask))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_stats_only_pass_reads_no_values(num_splits):
    batch = make_batch(32, 32, shapes=SPLIT_SHAPES, hq=8, hkv=2)
    key_mask = make_key_mask(batch)
    batch.v_cache.fill_(float("nan"))  # a V read would poison nothing here, so check with None too
    _, k_cache, _, qsl, seq_lens, table, scale = batch.args(DEVICE)
    lse, ent = TA.paged_attention_stats(
        batch.q.to(DEVICE), k_cache, qsl, seq_lens, table, scale, key_mask.to(DEVICE), num_splits=num_splits
    )
    _, want_lse, want_ent = paged_attention_ref(*batch.args(), key_mask=key_mask, return_stats=True)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.cpu(), want_ent, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to compute"):
        TA.paged_attention_into(None, None, None, batch.q, k_cache, None, qsl, seq_lens, table, scale)


def test_auto_split_count():
    assert TA.auto_num_splits(programs=32, sms=0) == 1  # CPU / interpreter: no split
    assert TA.auto_num_splits(programs=2048, sms=132) == 1  # the batch fills the GPU
    assert TA.auto_num_splits(programs=32, sms=132) == 16  # batch-1 MHA decode: capped
    assert TA.auto_num_splits(programs=256, sms=132) == 3  # batch-8 MHA decode
    assert TA.auto_num_splits(programs=4, sms=132, max_seq_len=600) == 3  # >= 256 keys a segment


def test_auto_split_runs_when_the_grid_is_small(monkeypatch):
    """With a (pretend) 8-SM device the automatic choice splits; results still match."""
    batch = make_batch(32, 32, shapes=((1, 70), (1, 33)), hq=4, hkv=2)
    monkeypatch.setattr(TA, "num_sms", lambda device: 8)
    launches = []
    real = TA._merge_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(TA, "_merge_splits_kernel", Spy())
    got = run_triton(batch, make_sinks(batch))
    assert launches == [(2, 2)]  # one merge launch over (T, Hkv)
    assert_matches(got, dense_expected(batch, make_sinks(batch), None))


@pytest.mark.parametrize(("block_m", "tile_n", "num_stages"), [(64, 64, 2), (64, 32, 4), (128, 16, 3)])
def test_prefill_launch_paths(block_m, tile_n, num_stages):
    """Prefill tiles: many mask-free interior tiles and a diagonal per query tile, GQA group 2."""
    batch = make_batch(32, 16, shapes=((70, 70), (9, 100), (1, 20)), hq=4, hkv=2)
    sinks, key_mask = make_sinks(batch), make_key_mask(batch)
    got = run_triton(batch, sinks, key_mask, block_m=block_m, tile_n=tile_n, num_stages=num_stages)
    assert_matches(got, dense_expected(batch, sinks, key_mask))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_cache_layouts_read_in_place(layout, num_splits):
    """FlashAttention's [2, NB, BS, H, D], vLLM Triton's [NB, 2, BS, H, D] and the plugin's
    [NB, H, BS, 2D] caches, built from the same tokens, give the dense reference's rows."""
    batch = make_batch(32, 16, shapes=((3, 40), (1, 23)), hq=4, hkv=2, layout=layout)
    reference = make_batch(32, 16, shapes=((3, 40), (1, 23)), hq=4, hkv=2)  # same seed, same tokens
    for a, b in zip(batch.keys + batch.values, reference.keys + reference.values, strict=True):
        assert torch.equal(a, b)
    base = batch.k_cache.untyped_storage().data_ptr()
    assert batch.v_cache.untyped_storage().data_ptr() == base  # one cache tensor, two views
    sinks, key_mask = make_sinks(batch), make_key_mask(batch)
    got = run_triton(batch, sinks, key_mask, num_splits=num_splits)
    assert_matches(got, dense_expected(reference, sinks, key_mask))


def test_split_kv_layout_errors():
    with pytest.raises(ValueError, match="flash layout"):
        split_kv(torch.zeros(3, 2, 4, 1, 8), "flash")
    with pytest.raises(ValueError, match="triton layout"):
        split_kv(torch.zeros(2, 3, 4, 1, 8), "triton")
    with pytest.raises(ValueError, match="unknown"):
        split_kv(torch.zeros(2, 3, 4, 1, 8), "nhd")  # type: ignore[arg-type]
    k, v = split_kv(torch.arange(2 * 3 * 4 * 1 * 8.0).view(2, 3, 4, 1, 8), "flash")
    assert k.shape == v.shape == (3, 4, 1, 8) and v[0, 0, 0, 0] == 3 * 4 * 8


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs are only observable on a CUDA device")
def test_launch_paths_do_not_sync_the_host():
    batch = make_batch(64, 16, torch.float16, shapes=((1, 90), (5, 40)), hq=8, hkv=2)
    args = batch.args(DEVICE)
    sinks, key_mask = make_sinks(batch).to(DEVICE), make_key_mask(batch).to(DEVICE)
    TA.paged_attention(*args, sinks, key_mask, True, num_splits=3)  # compile outside the check
    TA.paged_attention(*args, sinks, key_mask, True, num_splits=1)
    TA.paged_attention_stats(args[0], args[1], *args[3:], key_mask, num_splits=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for splits in (None, 1, 3):
            TA.paged_attention(*args, sinks, key_mask, True, num_splits=splits)
        TA.paged_attention_stats(args[0], args[1], *args[3:], key_mask, num_splits=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
