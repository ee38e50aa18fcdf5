"""The native CPU kernels (:mod:`vllm_halluguard.kernels.cpu_native`) against the torch ops they replace,
in the model dtypes the CPU engine serves, and the torch ops serving where they cannot be built.

The engine-level equalities (the methods' math, the reference) are in tests/test_engine_prunehal_step.py
and tests/test_engine_kvsmooth_step.py, over both paths."""

from __future__ import annotations

import pytest
import torch

from vllm_halluguard.kernels import cpu_native
from vllm_halluguard.kernels.reference import attention_rows_padded
from vllm_halluguard.methods.prunehal import PruneHalConfig, prune_step, scores_statistic

BS, HKV, HQ, D = 8, 2, 4, 16


def _cache(n_blocks: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[NB, BS, Hkv, D]`` as strided views of one packed tensor, K dim-major (as vLLM's CPU
    pages with the ``vec`` ISA), V token-major."""
    raw = torch.randn(n_blocks, HKV, 2, BS * D, generator=g).to(dtype)
    k = raw.as_strided((n_blocks, BS, HKV, D), (HKV * 2 * BS * D, 1, 2 * BS * D, BS))
    v = raw.as_strided((n_blocks, BS, HKV, D), (HKV * 2 * BS * D, D, 2 * BS * D, 1), BS * D)
    return k, v


@pytest.mark.parametrize(
    ("dtype", "statistic", "with_sinks"),
    [(torch.float32, "mean", False), (torch.bfloat16, "mass", False), (torch.float32, "mean", True)],
)
def test_prunehal_layer_equals_the_masked_softmax_in_torch(dtype, statistic, with_sinks):
    """Output of the rows it writes, untouched output elsewhere, the head-mean probabilities on the visual
    keys (zero on pruned ones) and their statistic, against :func:`attention_rows_padded` over the same
    keys and :func:`scores_statistic`; with sink logits (a composition's FarSight mode B, ``-inf`` in one
    row) the output takes them, the statistics do not."""
    g = torch.Generator().manual_seed(0)
    rows, nb, nv = 5, 32, 10
    k_view, v_view = _cache(nb, dtype, g)
    lens = torch.tensor([30, 17, 41, 9 + nv, 33])
    s_max = int(lens.max())
    ids = torch.randperm(nb, generator=g)[: rows * 6].view(rows, 6)
    visual = torch.arange(2, 2 + nv).expand(rows, nv).contiguous()
    keep = torch.rand(rows, nv, generator=g) < 0.5
    write = torch.tensor([True, False, True, True, False])
    query = torch.randn(rows + 3, HQ, D, generator=g).to(dtype)
    last = torch.tensor([7, 0, 3, 5, 2])
    output = torch.randn(rows + 3, HQ, D, generator=g).to(dtype)
    before = output.clone()
    stacked = torch.stack([~keep, keep], 1)  # [B, L, Nv]: layer index 1 is this one
    sinks = None
    if with_sinks:  # layer index 0's sinks must not be read
        sinks = torch.stack([torch.full((rows, HQ), 50.0), torch.randn(rows, HQ, generator=g) + 1.0], 1)
        sinks[2, 1] = float("-inf")
    stat, A = cpu_native.prunehal_layer(
        query, last, k_view, v_view, ids, lens, visual, stacked, torch.stack([~write, write]), output, 0.3, 1,
        statistic, sinks=sinks,
    )  # fmt: skip

    k = k_view[ids].flatten(1, 2)[:, :s_max]
    v = v_view[ids].flatten(1, 2)[:, :s_max]
    mask = torch.arange(s_max)[None, :] < lens[:, None]
    mask.scatter_(1, visual, keep)
    v = v.masked_fill(~mask[:, :, None, None], 0)
    layer_sinks = None if sinks is None else sinks[:, 1]
    out, _, probs = attention_rows_padded(query[last], k, v, 0.3, mask, layer_sinks)
    if sinks is not None:  # the sinks took mass from the rows they apply to
        plain = attention_rows_padded(query[last], k, v, 0.3, mask)[0]
        assert not torch.allclose(out[0], plain[0], atol=1e-3) and torch.equal(out[2], plain[2])
    want_stat = (probs.gather(-1, visual[:, None, :].expand(-1, HQ, -1)) * keep[:, None, :]).mean(1)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(stat, want_stat, **tol)
    torch.testing.assert_close(A, scores_statistic(want_stat, keep, statistic)[0], **tol)
    for b in range(rows):
        if write[b]:
            torch.testing.assert_close(output[last[b]], out[b], **tol)
        else:
            assert torch.equal(output[last[b]], before[last[b]])
    untouched = [t for t in range(rows + 3) if t not in last[write].tolist()]
    assert torch.equal(output[untouched], before[untouched])


@pytest.mark.parametrize(
    "cfg",
    [
        PruneHalConfig(r=0.4, t=2, layers=(0, 1, 2)),
        PruneHalConfig(r=0.4, t=3, layers=(0, 1, 2), force_step=None, vote_frac=0.3),
        PruneHalConfig(r=0.4, t=3, layers=(0, 1, 2), history="first_step", vote_threshold=0.9),
    ],
)
def test_prunehal_vote_equals_prune_step(cfg):
    """Fired, prune count and history after a step, against :func:`prune_step` on rows at every kind of
    state: no history yet, at the forced step, past it with and without a majority, out of prunes."""
    g = torch.Generator().manual_seed(2)
    rows = 12
    A = torch.rand(rows, 3, generator=g)
    hist_sum = torch.rand(rows, 3, generator=g) * 3
    hist_n = torch.tensor([0, 0, 1, 1, 2, 3, 1, 2, 4, 1, 2, 1])
    count = torch.tensor([0, 0, 0, 1, 1, 2, 3, 0, 1, 2, 0, 1])
    steps = torch.tensor([1, 2, 2, 3, 4, 5, 6, 3, 7, 2, 9, 4])
    keep = torch.ones(rows, 3, 5, dtype=torch.bool)
    scores = torch.rand(rows, 3, 5, generator=g)
    fired, count2, hist_sum2, hist_n2 = cpu_native.prunehal_vote(A, hist_sum, hist_n, count, steps, cfg)
    want = prune_step(steps, cfg, keep, count, A, scores, hist_sum, hist_n)
    assert torch.equal(fired, want[0]), (fired, want[0])
    assert 0 < int(fired.sum()) < rows
    assert torch.equal(count2, want[2]) and torch.equal(hist_n2, want[4])
    torch.testing.assert_close(hist_sum2, want[3])


@pytest.mark.parametrize("with_kept", [False, True])
def test_kvsmooth_layer_equals_the_torch_ops(with_kept):
    """Entropy (both head reductions), FIFO push, rank lambda and EMA against the method's math; with
    another method's key mask (a composition's PruneHal: some rows' visual keys off, one row padded with
    -1 positions, one row keeping all) the entropy is the softmax's over the kept keys."""
    from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, ema, head_entropy, update_lambda

    g = torch.Generator().manual_seed(1)
    rows, nb, layers, width = 4, 20, 3, 15
    kept = None
    if with_kept:
        visual = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [0, 1, 2, 3], [2, 3, 4, 5]])
        keep = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
        kept = (visual, keep)
    for reduce in ("mean_entropy", "entropy_of_mean"):
        cfg = KVSmoothConfig(lam_ref=0.5, window=4, layers=(1,), head_reduce=reduce)
        k_view, v_view = _cache(nb, torch.float32, g)
        lens = torch.tensor([12, 20, 5, 31])
        ids = torch.randperm(nb, generator=g)[: rows * 4].view(rows, 4)
        pos = torch.stack([lens - 2, lens - 1], 1)
        blocks, offsets = ids.gather(1, pos // BS), pos % BS
        queue = torch.rand(rows + 2, layers, width, generator=g)
        count = torch.tensor([[0, 6, 0], [0, 1, 0], [0, 3, 0], [0, 9, 0], [0, 0, 0], [0, 0, 0]])
        slot = torch.tensor([4, 0, 2, 3])
        token = torch.tensor([1, 0, 3, 2])
        first = torch.tensor([False, True, False, False])
        query = torch.randn(rows, HQ, D, generator=g)
        k0, v0, q0, c0 = k_view.clone(), v_view.clone(), queue.clone(), count.clone()
        cpu_native.kvsmooth_layer(
            query, token, k_view, v_view, ids, lens, queue, count, slot, 1, first, blocks, offsets,
            kept=kept, window=4, lo=0.2, hi=0.8, inclusive=cfg.rank_inclusive,
            by_window=cfg.rank_divisor == "window", entropy_of_mean=reduce == "entropy_of_mean", scale=0.25,
        )  # fmt: skip
        for b in range(rows):
            keys = k0[ids[b]].flatten(0, 1)[: lens[b]]
            q = query[token[b]].view(HKV, HQ // HKV, D)
            logits = torch.einsum("kgd,skd->kgs", q, keys).reshape(HQ, -1) * 0.25
            if kept is not None:
                pairs = zip(kept[0][b].tolist(), kept[1][b].tolist(), strict=True)
                off = [p for p, k in pairs if p >= 0 and not k]
                logits[:, off] = float("-inf")
            z = head_entropy(torch.softmax(logits, -1), reduce)[None]
            cfg_b = cfg.model_copy(update={"clip": 0.3})
            lam, fifo, pushed = update_lambda(q0[slot[b], 1, :4][None], c0[slot[b], 1][None], z, cfg_b)
            torch.testing.assert_close(queue[slot[b], 1, :4], fifo[0])
            assert int(count[slot[b], 1]) == int(pushed[0])
            lam = torch.zeros_like(lam) if first[b] else lam
            for view, raw in ((k_view, k0), (v_view, v0)):
                prev, cur = raw[blocks[b, 0], offsets[b, 0]], raw[blocks[b, 1], offsets[b, 1]]
                torch.testing.assert_close(
                    view[blocks[b, 1], offsets[b, 1]], ema(prev[None], cur[None], lam)[0]
                )
        assert torch.equal(queue[:, [0, 2]], q0[:, [0, 2]]) and torch.equal(count[:, [0, 2]], c0[:, [0, 2]])


def test_without_a_compiler_the_torch_ops_serve(monkeypatch):
    """A failed build leaves :func:`~vllm_halluguard.engine.cache_io.native_views` at ``None`` (the
    layers' torch ops serve), and ``HALLUGUARD_CPU_NATIVE=0`` turns the kernels off without building."""
    from types import SimpleNamespace

    from torch.utils import cpp_extension

    from vllm_halluguard.engine import cache_io, tp

    monkeypatch.setattr(tp, "tp_group", lambda: tp._SINGLE)
    views = (torch.zeros(2, BS, HKV, D), torch.zeros(2, BS, HKV, D))
    call = SimpleNamespace(
        query=torch.zeros(1, HQ, D), io=SimpleNamespace(kernel_views=lambda: views), plan=None
    )
    assert cache_io.native_views(call) is views

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    monkeypatch.setattr(cpu_native, "_module", None)
    monkeypatch.setattr(cpu_native, "_failed", False)
    assert cpu_native.module() is None and cache_io.native_views(call) is None
    monkeypatch.setattr(cpu_native, "_failed", False)
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    assert cpu_native.module() is None and cache_io.native_views(call) is None
    assert not cpu_native._failed  # off: nothing was tried


def test_the_kernels_refuse_indices_outside_their_tensors():
    """A page id, token, slot or EMA address outside its tensor is an error, not a stray read or write."""
    g = torch.Generator().manual_seed(3)
    k_view, v_view = _cache(4, torch.float32, g)
    query, output = torch.randn(2, HQ, D, generator=g), torch.zeros(2, HQ, D)
    lens, visual = torch.tensor([10, 12]), torch.tensor([[1, 2], [1, 2]])
    keep, write = torch.ones(2, 1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)

    def prunehal(ids, last):
        return cpu_native.prunehal_layer(
            query, last, k_view, v_view, ids, lens, visual, keep, write, output, 0.3, 0, "mean"
        )

    good_ids, good_last = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    prunehal(good_ids, good_last)  # in range: runs
    for ids, last in ((torch.tensor([[0, 9], [2, 3]]), good_last), (good_ids, torch.tensor([0, 2]))):
        with pytest.raises(RuntimeError, match="out of range"):
            prunehal(ids, last)
    queue, count = torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.long)
    blocks, offsets = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[7, 1], [7, 3]])

    def kvsmooth(slot, offsets):
        cpu_native.kvsmooth_layer(
            query, good_last, k_view, v_view, good_ids, lens, queue, count, slot, 0, None, blocks, offsets,
            window=4, lo=0.0, hi=1.0, inclusive=True, by_window=False, entropy_of_mean=False, scale=0.3,
        )  # fmt: skip

    kvsmooth(torch.tensor([0, 1]), offsets)
    with pytest.raises(RuntimeError, match="out of range"):
        kvsmooth(torch.tensor([0, 5]), offsets)
    with pytest.raises(RuntimeError, match="out of range"):
        kvsmooth(torch.tensor([0, 1]), torch.tensor([[7, 1], [7, BS]]))
