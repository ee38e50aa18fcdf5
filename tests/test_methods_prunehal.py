"""PruneHal math: statistics, vote, top-r keep set, history, and the 576 -> 230 -> 92 -> 36 schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_halluguard.methods.prunehal import (
    PruneHalConfig,
    history_mean,
    keep_blocks,
    keep_topr,
    prune_schedule,
    prune_step,
    select_keep,
    should_prune,
    update_history,
    visual_attention_stats,
    visual_groups,
)


def test_visual_attention_stats() -> None:
    # [B=1, L=1, H=2, Nv=4]
    probs = torch.tensor([[[[0.1, 0.2, 0.3, 0.0], [0.3, 0.0, 0.1, 0.2]]]])
    keep = torch.tensor([[[True, True, False, True]]])
    A, scores = visual_attention_stats(probs, keep)
    torch.testing.assert_close(scores, torch.tensor([[[0.2, 0.1, 0.2, 0.1]]]))
    assert A.item() == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    mass, _ = visual_attention_stats(probs, keep, statistic="mass")
    assert mass.item() == pytest.approx(0.4)


def test_keep_topr_floor_ties_and_prior_mask() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.7, 0.3, 0.8]])
    keep = torch.tensor([[True, True, True, True, True, True, False]])  # index 6 already pruned
    new = keep_topr(scores, keep, r=0.5)  # floor(0.5 * 6) = 3
    # top-3 among kept: 0.9 (idx 1), 0.9 (idx 3), 0.7 (idx 4); idx 6 (0.8) stays pruned.
    assert new.tolist() == [[False, True, False, True, True, False, False]]
    tie = keep_topr(torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool), r=0.4)
    assert tie.tolist() == [[True, True, False, False, False]]  # ties: lower index first
    assert keep_topr(scores, keep, r=1.0).tolist() == keep.tolist()


def test_should_prune_rules() -> None:
    count = torch.zeros(1, dtype=torch.long)
    hist = torch.ones(1, 4)
    thr = math.sqrt(0.4)
    two_votes = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # 0.5 < 0.632: exactly half the layers vote
    one_vote = torch.tensor([[0.5, 1.0, 1.0, 1.0]])
    just_above = torch.full((1, 4), thr + 1e-6)
    assert should_prune(3, count, two_votes, hist, 0.4, 3).item()
    assert not should_prune(3, count, one_vote, hist, 0.4, 3).item()
    assert not should_prune(3, count, just_above, hist, 0.4, 3).item()
    assert not should_prune(3, count, two_votes, hist, 0.4, 3, vote_frac=0.75).item()
    # Forced at step 2 regardless of the vote; no pruning before it.
    assert should_prune(2, count, just_above, hist, 0.4, 3).item()
    assert not should_prune(1, count, two_votes, hist, 0.4, 3).item()
    # Budget t exhausted.
    assert not should_prune(2, torch.tensor([3]), two_votes, hist, 0.4, 3).item()
    # No history (NaN) -> no vote; forced prune off -> votes decide from any step.
    nan_hist = torch.full((1, 4), math.nan)
    assert not should_prune(5, count, two_votes, nan_hist, 0.4, 3).item()
    assert should_prune(1, count, two_votes, hist, 0.4, 3, force_step=None).item()
    # Batched.
    both = should_prune(3, torch.tensor([0, 3]), torch.cat([two_votes, two_votes]), hist.expand(2, 4), 0.4, 3)
    assert both.tolist() == [True, False]


def test_history_running_mean_and_reset() -> None:
    s, n = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    assert torch.isnan(history_mean(s, n)).all()
    no = torch.tensor([False])
    for a in ([1.0, 4.0], [2.0, 5.0], [3.0, 6.0]):
        s, n = update_history(s, n, torch.tensor([a]), no)
    assert history_mean(s, n).tolist() == [[2.0, 5.0]]
    s, n = update_history(s, n, torch.tensor([[10.0, 20.0]]), torch.tensor([True]))
    assert history_mean(s, n).tolist() == [[10.0, 20.0]]  # re-initialised at the prune to that step
    s2, n2 = update_history(
        torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), torch.tensor([[7.0]]), no, "first_step"
    )
    s2, n2 = update_history(s2, n2, torch.tensor([[1.0]]), torch.tensor([True]), "first_step")
    assert history_mean(s2, n2).item() == 7.0


def test_schedule_floor() -> None:
    assert prune_schedule(576, 0.4, 3) == [576, 230, 92, 36]
    assert prune_schedule(32, 0.7, 2) == [32, 22, 15]
    assert prune_schedule(256, 0.9, 4) == [256, 230, 207, 186, 167]


def test_synthetic_trace_576_230_92_36() -> None:
    """Drive the decision loop with a synthetic attention trace (32 layers, 8 heads, 576 visual tokens)."""
    g = torch.Generator().manual_seed(0)
    n_layers, heads, nv, r, t = 32, 8, 576, 0.4, 3
    base = torch.rand(1, n_layers, heads, nv, generator=g) / nv
    # Per-step scale of the visual attention: drops at steps 4, 6 and 7 (votes), flat otherwise.
    scale = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.1, 5: 0.1, 6: 0.001, 7: 1e-6, 8: 1e-6}
    keep = torch.ones(1, n_layers, nv, dtype=torch.bool)
    count = torch.zeros(1, dtype=torch.long)
    hs, hn = torch.zeros(1, n_layers), torch.zeros(1, dtype=torch.long)
    kept, fired_at = [], []
    for step in range(1, 9):
        probs = base * scale[step] * keep[:, :, None, :]  # pruned keys get no attention
        A, scores = visual_attention_stats(probs, keep)
        fire = should_prune(step, count, A, history_mean(hs, hn), r, t)
        if fire.item():
            fired_at.append(step)
            expected_top = torch.argsort(-scores[0, 5].masked_fill(~keep[0, 5], -1.0), stable=True)
            n_keep = math.floor(r * int(keep[0, 5].sum()))
            new = keep_topr(scores, keep, r)
            assert set(torch.nonzero(new[0, 5]).flatten().tolist()) == set(expected_top[:n_keep].tolist())
            keep = new
        count = count + fire.long()
        hs, hn = update_history(hs, hn, A, fire)
        kept.append(int(keep[0, 0].sum()))
        assert bool((keep.sum(-1) == kept[-1]).all())  # every layer keeps the same number
    assert fired_at == [2, 4, 6]  # forced at 2, then two votes; step 7 would vote but t = 3 is used up
    assert kept == [576, 230, 230, 92, 92, 36, 36, 36]


def test_shared_selection_ranks_by_the_layers_mean() -> None:
    # [B=1, L=2, Nv=4]: layer 0 prefers token 0, layer 1 token 3; mean = [0.5, 0.1, 0.2, 0.6]
    scores = torch.tensor([[[0.9, 0.1, 0.3, 0.2], [0.1, 0.1, 0.1, 1.0]]])
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    cfg = PruneHalConfig(r=0.5, t=1, selection="shared")
    assert select_keep(scores, keep, cfg).tolist() == [[[True, False, False, True]] * 2]
    per_layer = select_keep(scores, keep, PruneHalConfig(r=0.5, t=1))
    assert per_layer.tolist() == [[[True, False, True, False], [True, False, False, True]]]
    # layer 1 ties at 0.1: the lower index


def test_block_granularity_keeps_whole_groups() -> None:
    # visual positions 6..13 with block 4: groups {6,7}, {8..11}, {12,13} -> 0, 1, 2
    visual = torch.arange(6, 14)
    groups = visual_groups(visual, 4)
    assert groups.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    scores = torch.tensor([[0.30, 0.30, 0.05, 0.05, 0.05, 0.05, 0.25, 0.0]])  # sums 0.6, 0.2, 0.25
    keep = torch.ones(1, 8, dtype=torch.bool)
    # floor(0.4 * 3) = 1 group: the first (0.6)
    assert keep_blocks(scores, keep, groups, 0.4).tolist() == [[True, True] + [False] * 6]
    # floor(0.7 * 3) = 2 groups: 0 (0.6) and 2 (0.25); pruned tokens stay pruned
    keep[0, 7] = False
    new = keep_blocks(scores, keep, groups, 0.7)
    assert new.tolist() == [[True, True, False, False, False, False, True, False]]
    # a group whose tokens are all pruned no longer counts: floor(0.5 * 2) = 1 of groups {0, 2}
    only = torch.tensor([[True, True, False, False, False, False, True, True]])
    assert keep_blocks(scores, only, groups, 0.5).tolist() == [[True, True] + [False] * 6]


def test_shared_block_selection_equal_in_all_layers() -> None:
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 40)
    keep = torch.ones(2, 3, 40, dtype=torch.bool)
    groups = visual_groups(torch.arange(5, 45).expand(2, -1), 8)
    cfg = PruneHalConfig(r=0.4, t=3, selection="shared", granularity="block", block=8)
    new = select_keep(scores, keep, cfg, groups)
    assert bool((new == new[:, :1]).all())  # one mask for all layers
    for b in range(2):  # whole aligned 8-position blocks kept: floor(0.4 * 6) = 2 of the 6 groups
        kept_groups = set(groups[b][new[b, 0]].tolist())
        assert len(kept_groups) == 2 and int(new[b, 0].sum()) == sum(
            int((groups[b] == g).sum()) for g in kept_groups
        )
    with pytest.raises(ValueError, match="groups"):
        select_keep(scores, keep, cfg)


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_prune_step_without_host_reads_decides_the_same(granularity: str) -> None:
    """``skip_idle=False`` (the masks selected whether or not a request fired) and a known ``num_groups``
    (the engine's device path) give the decisions of the default path; requests that do not fire keep
    their masks."""
    g = torch.Generator().manual_seed(4)
    b, n_layers, nv = 3, 2, 12
    cfg = PruneHalConfig(r=0.5, t=3, layers=(0, 1), granularity=granularity, block=4)  # type: ignore[arg-type]
    groups = visual_groups(torch.arange(5, 5 + nv).expand(b, -1), 4)
    keep = torch.rand(b, n_layers, nv, generator=g) > 0.2
    args = (
        torch.tensor([2, 3, 3]),  # forced prune for request 0, votes for the others
        cfg,
        keep,
        torch.tensor([0, 1, 3]),  # request 2 has used its prunes
        torch.rand(b, n_layers, generator=g),
        torch.rand(b, n_layers, nv, generator=g),
        torch.tensor([[5.0, 5.0], [0.1, 0.1], [5.0, 5.0]]),
        torch.tensor([1, 1, 1]),
        groups if granularity == "block" else None,
    )
    want = prune_step(*args)
    got = prune_step(*args, num_groups=int(groups.max()) + 1, skip_idle=False)
    assert want[0].tolist() == [True, False, False]
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(got[1][1:], keep[1:]) and not torch.equal(got[1][0], keep[0])
