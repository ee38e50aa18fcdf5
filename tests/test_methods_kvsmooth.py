"""KVSmooth math: entropy identity, ring-buffer rank, lambda clipping, EMA."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_halluguard.methods.kvsmooth import (
    KVSmoothConfig,
    ema,
    fifo_push,
    head_entropy,
    rank_lambda,
    row_entropy,
    row_entropy_from_lse,
    update_lambda,
)


def test_entropy_equals_lse_minus_q_dot_attn_with_v_eq_k() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 3, 4, 23, 16
    q = torch.randn(b, h, d, generator=g, dtype=torch.float64)
    k = 2.0 * torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d)
    logits = torch.einsum("bhd,bhtd->bht", q, k) * scale
    # Independent dense entropy: explicit softmax, -sum p log p.
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    h_dense = -(p * torch.log(p)).sum(-1)
    lse = torch.log(torch.exp(logits).sum(-1))
    o_k = torch.einsum("bht,bhtd->bhd", p, k)  # attention output with V := K
    h_lse = row_entropy_from_lse(lse, q, o_k, scale).double()
    torch.testing.assert_close(h_lse, h_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_entropy(p).double(), h_dense, rtol=1e-5, atol=1e-5)


def test_entropy_edge_cases() -> None:
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert row_entropy(one_hot).item() == 0.0
    uniform = torch.full((8,), 1 / 8)
    assert row_entropy(uniform).item() == pytest.approx(math.log(8))
    # Mean of per-head entropies vs entropy of the head-mean row.
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert head_entropy(rows, "mean_entropy").item() == 0.0
    assert head_entropy(rows, "entropy_of_mean").item() == pytest.approx(math.log(2))


def test_fifo_ring_buffer() -> None:
    q = torch.zeros(2, 3)
    c = torch.tensor([0, 5])
    q, c = fifo_push(q, c, torch.tensor([1.0, 2.0]))
    assert q.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]  # slots 0 % 3 and 5 % 3
    assert c.tolist() == [1, 6]
    for v in (3.0, 4.0, 5.0):
        q, c = fifo_push(q, c, torch.tensor([v, v]))
    assert q[0].tolist() == [5.0, 3.0, 4.0]  # 4 pushes into 3 slots: oldest (1.0) overwritten


def test_rank_lambda_hand_values() -> None:
    m = 15
    queue = torch.zeros(1, m)
    count = torch.zeros(1, dtype=torch.long)
    # First value: no entries below it -> rank 0 -> lambda clipped up to lam_ref - clip = 0.7.
    lam, queue, count = update_lambda(queue, count, torch.tensor([5.0]), KVSmoothConfig(lam_ref=0.9))
    assert lam.item() == pytest.approx(0.7)
    # Unclipped: 4 valid entries below z, divided by M (not by the fill): 4 / 15.
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 9.0] + [0.0] * 9])
    cnt = torch.tensor([6])
    z = torch.tensor([4.5])
    q, cnt = fifo_push(q, cnt, z)
    assert rank_lambda(q, cnt, z, lam_ref=0.5, clip=1.0).item() == pytest.approx(4 / 15)
    # The zeros in unfilled slots are not counted (they are below z but invalid).
    assert rank_lambda(q, cnt, z, lam_ref=0.5, clip=1.0, divisor="filled").item() == pytest.approx(4 / 7)
    # Inclusive rank counts z itself.
    assert rank_lambda(q, cnt, z, lam_ref=0.5, clip=1.0, inclusive=True).item() == pytest.approx(5 / 15)


def test_rank_lambda_full_queue_max_and_clip() -> None:
    # Full queue, z strictly largest: 14 of 15 entries below -> 14/15, never 1.
    q = torch.arange(15, dtype=torch.float32).unsqueeze(0)
    cnt = torch.tensor([40])
    z = q[:, 14].clone()
    assert rank_lambda(q, cnt, z, lam_ref=0.5, clip=1.0).item() == pytest.approx(14 / 15)
    assert rank_lambda(q, cnt, z, lam_ref=0.9, clip=0.2).item() == pytest.approx(14 / 15)
    assert rank_lambda(q, cnt, z, lam_ref=0.5, clip=0.2).item() == pytest.approx(0.7)
    assert rank_lambda(q, cnt, q[:, 0].clone(), lam_ref=0.1, clip=0.2).item() == 0.0  # floor at 0


def test_rank_lambda_is_batched() -> None:
    g = torch.Generator().manual_seed(1)
    queue = torch.randn(4, 3, 15, generator=g)
    count = torch.tensor([[0, 3, 15], [20, 1, 7], [14, 15, 16], [2, 2, 2]])
    z = torch.randn(4, 3, generator=g)
    lam = rank_lambda(queue, count, z, lam_ref=0.5, clip=0.5)
    for i in range(4):
        for j in range(3):
            n = min(int(count[i, j]), 15)
            below = sum(float(queue[i, j, s]) < float(z[i, j]) for s in range(n))
            assert lam[i, j].item() == pytest.approx(min(max(below / 15, 0.0), 1.0))


def test_ema_formula_and_identity() -> None:
    prev = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    cur = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    out = ema(prev, cur, torch.tensor([0.25, 1.0]))
    assert out.tolist() == [[0.75 * 5 + 0.25 * 1, 0.75 * 6 + 0.25 * 2], [3.0, 4.0]]
    g = torch.Generator().manual_seed(2)
    big = torch.randn(3, 2, 8, generator=g)
    assert torch.equal(ema(torch.randn(3, 2, 8, generator=g), big, torch.zeros(3)), big)
    half = ema(
        torch.zeros(2, 4, dtype=torch.bfloat16),
        torch.ones(2, 4, dtype=torch.bfloat16),
        torch.tensor([0.5, 0]),
    )
    assert half.dtype == torch.bfloat16 and half[0, 0].item() == 0.5 and half[1, 0].item() == 1.0
