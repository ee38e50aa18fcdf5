"""SCR math: source/neighbour selection on patch grids, the edit as one linear map, grids."""

from __future__ import annotations

import pytest
import torch

from vllm_halluguard.methods.scr import (
    apply_edit,
    border_mask,
    llava_grid,
    qwen2_vl_grid,
    redistribution_matrix,
    select_sources,
    visual_attention_map,
)


def rc(p: int, w: int) -> tuple[int, int]:
    return divmod(p, w)


def test_grids() -> None:
    assert llava_grid(576) == (1, 24, 24)
    assert llava_grid(64) == (1, 8, 8)
    with pytest.raises(ValueError):
        llava_grid(60)
    assert qwen2_vl_grid((1, 8, 8)) == (1, 4, 4)
    assert qwen2_vl_grid(torch.tensor([2, 16, 12])) == (2, 8, 6)
    mask = border_mask((1, 4, 5))
    assert int(mask.sum()) == 4 * 5 - 2 * 3
    assert not mask[1 * 5 + 1] and mask[0] and mask[4 * 5 - 1]


def test_selection_hand_example() -> None:
    # 5x5 grid, 3x3 interior. Highest attention on the border (ignored as a source), then the centre.
    a = torch.zeros(25)
    a[0] = 10.0  # corner: border, never a source
    a[12] = 5.0  # centre (2, 2)
    a[6] = 4.0  # (1, 1): interior, adjacent to the centre
    a[18] = 3.0  # (3, 3)
    sel = select_sources(a, (1, 5, 5), top_k=3)
    assert sel.sources.tolist() == [[12, 6, 18]]
    owner = sel.owner[0].tolist()
    # Sources are never neighbours.
    assert owner[12] == owner[6] == owner[18] == -1
    # The centre claims all its non-source neighbours first: (1,2),(1,3),(2,1),(2,3),(3,1),(3,2).
    for p in (7, 8, 11, 13, 16, 17):
        assert owner[p] == 12, p
    # (1,1)=6 keeps the rest of its ring, including border patches (0, 1, 2, 5, 10).
    for p in (0, 1, 2, 5, 10):
        assert owner[p] == 6, p
    # (3,3)=18 gets what is left of its ring: (2,4), (3,4), (4,2), (4,3), (4,4).
    for p in (14, 19, 22, 23, 24):
        assert owner[p] == 18, p
    assert owner[3] == -1 and owner[4] == -1 and owner[20] == -1


@pytest.mark.parametrize("connectivity", [8, 4])
def test_selection_invariants_random(connectivity: int) -> None:
    g = torch.Generator().manual_seed(0)
    h, w, k = 12, 9, 20
    a = torch.rand(3, h * w, generator=g)
    sel = select_sources(a, (1, h, w), top_k=k, connectivity=connectivity)
    border = border_mask((1, h, w))
    for b in range(3):
        src = sel.sources[b].tolist()
        owner = sel.owner[b].tolist()
        assert len(set(src)) == k and all(not border[s] for s in src)
        # Sources: the k interior patches with the highest attention, in descending order.
        interior = [p for p in range(h * w) if not border[p]]
        assert src == sorted(interior, key=lambda p: -a[b, p].item())[:k]
        rank = {s: i for i, s in enumerate(src)}
        for p in range(h * w):
            pr, pc = rc(p, w)
            adj = []
            for s in src:
                sr, sc = rc(s, w)
                dr, dc = abs(sr - pr), abs(sc - pc)
                near = max(dr, dc) == 1 if connectivity == 8 else dr + dc == 1
                if near:
                    adj.append(s)
            if p in rank:
                assert owner[p] == -1  # never both source and neighbour
            elif adj:
                assert owner[p] == min(adj, key=rank.__getitem__)  # highest-ranked source claims first
            else:
                assert owner[p] == -1
        # Each neighbour belongs to exactly one source (ownership is a function), at most 8 per source.
        counts = [owner.count(s) for s in src]
        assert max(counts) <= connectivity


def test_selection_degenerate() -> None:
    sel = select_sources(torch.rand(16), (1, 4, 4), top_k=32)  # only 4 interior patches
    assert (sel.sources >= 0).sum().item() == 4 and sel.sources.shape == (1, 32)
    assert (sel.owner >= 0).sum().item() == 12  # every border patch touches the 2x2 interior
    none = select_sources(torch.rand(16), (1, 4, 4), top_k=0)
    assert none.sources.shape == (1, 0) and (none.owner == -1).all()
    # Frames of a multi-frame grid are separate: no neighbour across frames.
    two = torch.zeros(2 * 9)
    two[4] = 1.0  # centre of frame 0
    sel2 = select_sources(two, (2, 3, 3), top_k=1)
    assert sel2.sources.tolist() == [[4]]
    assert (sel2.owner[0, :9] >= 0).sum().item() == 8 and (sel2.owner[0, 9:] == -1).all()


def test_edit_is_one_linear_map() -> None:
    g = torch.Generator().manual_seed(3)
    h, w, d, lam = 6, 7, 5, 1.1
    a = torch.rand(2, h * w, generator=g)
    sel = select_sources(a, (1, h, w), top_k=6)
    hv = torch.randn(2, h * w, d, generator=g, dtype=torch.float64)
    # Independent M: identity; +(lam-1) e_n e_s^T per neighbour; -(1 - 1/lam) e_s e_s^T per source.
    m = torch.zeros(2, h * w, h * w, dtype=torch.float64)
    for b in range(2):
        for i in range(h * w):
            m[b, i, i] = 1.0
        for n_, s in enumerate(sel.owner[b].tolist()):
            if s >= 0:
                m[b, n_, s] += lam - 1.0
        for s in sel.sources[b].tolist():
            m[b, s, s] -= 1.0 - 1.0 / lam
    torch.testing.assert_close(redistribution_matrix(sel.sources, sel.owner, lam), m)
    out = apply_edit(hv, sel.sources, sel.owner, lam)
    torch.testing.assert_close(out, m @ hv)
    # Hand semantics: sources / lam; neighbours + (lam - 1) h_s with the pre-edit h_s; others untouched.
    s0 = sel.sources[0, 0].item()
    n0 = (sel.owner[0] == s0).nonzero()[0].item()
    torch.testing.assert_close(out[0, s0], hv[0, s0] / 1.1)
    torch.testing.assert_close(out[0, n0], hv[0, n0] + 0.1 * hv[0, s0])
    untouched = (sel.owner[0] < 0) & ~torch.isin(torch.arange(h * w), sel.sources[0])
    assert torch.equal(out[0, untouched], hv[0, untouched])


def test_edit_identity_when_disabled() -> None:
    hv = torch.randn(1, 16, 4)
    sel = select_sources(torch.rand(16), (1, 4, 4), top_k=4)
    assert torch.equal(apply_edit(hv, sel.sources, sel.owner, 1.0), hv)
    none = select_sources(torch.rand(16), (1, 4, 4), top_k=0)
    assert torch.equal(apply_edit(hv, none.sources, none.owner, 1.1), hv)


def test_visual_attention_map() -> None:
    # [B=1, H=2, T=3, Nv=2]; rows 1 and 2 selected.
    p = torch.tensor([[[[0.9, 0.1], [0.2, 0.4], [0.0, 0.6]], [[0.9, 0.1], [0.4, 0.2], [0.2, 0.2]]]])
    m = visual_attention_map(p, torch.tensor([[False, True, True]]))
    torch.testing.assert_close(m, torch.tensor([[(0.3 + 0.1) / 2, (0.3 + 0.4) / 2]]))
