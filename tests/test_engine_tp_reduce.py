"""The tensor-parallel reduction (engine/tp.py) on one layer's heads split into two ranks: two threads, each
holding half the heads, whose all-reduce really sums their partials. The reduced statistics and the
decisions they feed (KVSmooth's lambda, PruneHal's vote and keep masks, FarSight's sinks) equal those
computed from all heads at once."""

import threading

import pytest
import torch

from vllm_halluguard.engine import tp
from vllm_halluguard.engine.farsight import row_sinks, steady_sinks
from vllm_halluguard.engine.kvsmooth import entropy
from vllm_halluguard.methods.farsight import FarSightConfig
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, head_entropy, update_lambda
from vllm_halluguard.methods.prunehal import (
    PruneHalConfig,
    prune_step,
    scores_statistic,
    visual_attention_stats,
)

HEADS = 8


class ThreadGroup:
    """A process group of ``world`` threads: ``all_reduce`` sums the tensors every rank contributed."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = 0

    def member(self, rank: int) -> "Member":
        return Member(self, rank)


class Member:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank_in_group, self.world_size = group, rank, group.world

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        g = self.group
        g.slots[self.rank_in_group] = input_.clone()
        g.barrier.wait()
        total = torch.stack(g.slots).sum(0)  # type: ignore[arg-type]
        g.calls += self.rank_in_group == 0
        g.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return total


_local = threading.local()


@pytest.fixture(autouse=True)
def _thread_tp_group(monkeypatch):
    """``tp.tp_group()`` is the calling thread's rank of :func:`on_ranks` (as vLLM's is the worker's)."""
    monkeypatch.setattr(tp, "tp_group", lambda: getattr(_local, "group", None) or tp._SINGLE)


def on_ranks(world: int, fn):
    """Run ``fn(group, rank)`` on ``world`` threads, each its own rank of one group; their results by
    rank, and the group."""
    group, results, errors = ThreadGroup(world), [None] * world, []

    def run(rank: int) -> None:
        _local.group = group.member(rank)
        try:
            results[rank] = fn(_local.group, rank)
        except BaseException as e:  # surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results, group


def _heads(rank: int, world: int, x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)


def _probs(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=g), -1)


def test_one_rank_is_the_plain_mean_and_communicates_nothing():
    x = torch.randn(3, HEADS, 5)
    (out,), group = on_ranks(1, lambda g, r: tp.head_mean(x, -2, g))
    assert torch.equal(out, x.mean(-2)) and group.calls == 0
    assert torch.equal(tp.head_mean(x, 1), x.mean(1))  # no group: one rank


@pytest.mark.parametrize("world", [2, 4])
def test_head_mean_of_split_heads_is_the_mean_over_all_heads(world):
    x = torch.randn(3, HEADS, 5, dtype=torch.float64)
    outs, group = on_ranks(world, lambda g, r: tp.head_mean(_heads(r, world, x, 1), 1, g))
    for out in outs:
        torch.testing.assert_close(out, x.mean(1).float(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(out, outs[0]) for out in outs), "ranks must hold the same value"
    assert group.calls == 1
    # a rank that skipped the reduction would see only its own heads' mean: the test can tell them apart
    assert not torch.allclose(_heads(0, world, x, 1).mean(1).float(), x.mean(1).float(), atol=1e-3)


def test_rank_mean_and_head_slice():
    x = torch.randn(4, HEADS)
    outs, _ = on_ranks(2, lambda g, r: tp.rank_mean(_heads(r, 2, x, 1).mean(1), g))
    torch.testing.assert_close(outs[0], x.mean(1))
    slices, _ = on_ranks(2, lambda g, r: tp.head_slice(HEADS // 2, g))
    assert slices == [(HEADS, slice(0, 4)), (HEADS, slice(4, 8))]


@pytest.mark.parametrize("reduce", ["mean_entropy", "entropy_of_mean"])
def test_kvsmooth_entropy_and_lambda_of_split_heads_equal_the_unsplit(reduce):
    probs = _probs(6, HEADS, 40, seed=1)  # 6 decode rows of one layer
    cfg = KVSmoothConfig(lam_ref=0.5, window=4, head_reduce=reduce)
    queue, count = torch.rand(6, 4), torch.tensor([0, 1, 3, 4, 7, 9])

    outs, _ = on_ranks(2, lambda g, r: entropy(_heads(r, 2, probs, 1), reduce))
    whole = head_entropy(probs, reduce)
    for z in outs:
        torch.testing.assert_close(z, whole, rtol=1e-5, atol=1e-6)
        lam, _, _ = update_lambda(queue, count, z, cfg)
        assert torch.equal(lam, update_lambda(queue, count, whole, cfg)[0])
    alone = head_entropy(_heads(0, 2, probs, 1), reduce)  # one rank's heads only: another entropy
    assert not torch.allclose(alone, whole, atol=1e-3)


@pytest.mark.parametrize("statistic", ["mean", "mass"])
def test_prunehal_statistics_vote_and_keep_of_split_heads_equal_the_unsplit(statistic):
    b, layers, nv = 3, 2, 24
    probs = _probs(b, layers, HEADS, nv, seed=2) * 0.6  # last row's probabilities on the visual keys
    keep = torch.ones(b, layers, nv, dtype=torch.bool)
    keep[1, :, ::3] = False
    cfg = PruneHalConfig(r=0.5, t=3, force_step=None, statistic=statistic, layers=(0, 1))

    def decide(A, scores, history):  # request 1's layers are far under their history: they vote
        return prune_step(torch.tensor([4, 4, 4]), cfg, keep, torch.zeros(b, dtype=torch.long), A, scores,
                          history, torch.ones(b, dtype=torch.long))  # fmt: skip

    on_visual = probs * keep[:, :, None]  # pruned keys have probability 0 (engine/prunehal.py)

    def rank(g, r):
        return scores_statistic(tp.head_mean(_heads(r, 2, on_visual, 2).float(), -2), keep, statistic)

    outs, _ = on_ranks(2, rank)
    A, scores = visual_attention_stats(on_visual, keep, statistic)
    history = A * torch.tensor([[1.0], [3.0], [1.0]])
    fired, kept, *_ = decide(A, scores, history)
    assert fired.tolist() == [False, True, False], "the vote would not be exercised"
    for A_r, scores_r in outs:
        torch.testing.assert_close(A_r, A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores_r, scores, rtol=1e-5, atol=1e-7)
        fired_r, kept_r, *_ = decide(A_r, scores_r, history)
        assert torch.equal(fired_r, fired) and torch.equal(kept_r, kept)


@pytest.mark.parametrize("mode", ["B", "C"])
def test_farsight_sinks_of_each_rank_are_its_own_heads(mode):
    cfg = FarSightConfig(mode=mode)
    positions, prompt_len = torch.arange(10), 12
    whole = row_sinks(cfg, positions, prompt_len, HEADS)

    def rank(g, r):
        return row_sinks(cfg, positions, prompt_len, HEADS // 2), steady_sinks(cfg, HEADS // 2)

    outs, _ = on_ranks(2, rank)
    assert torch.equal(torch.cat([o[0] for o in outs], dim=1), whole)
    assert torch.equal(torch.cat([o[1] for o in outs]), steady_sinks(cfg, HEADS))
    assert not torch.equal(outs[1][0], whole[:, : HEADS // 2]), "ALiBi slopes differ per head"
