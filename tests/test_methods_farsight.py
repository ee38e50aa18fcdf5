"""FarSight math: the official dense semantics equal std attention x sigmoid(LSE - log R); sinks; R."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_halluguard.methods.farsight import (
    alibi_slopes,
    log_register_mass,
    register_mass,
    rescale,
    rescale_factor,
    row_log_r,
    sink_logits,
)

SIGMA = math.log(256) / math.log(1024)


def official_dense(q, k, v, sigma, alibi=True, progressive=True):
    """Independent port of the official patch: W = s*C + P, softmax(W) * C, then @ V (all rows)."""
    h, n, d = q.shape
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    delta = (j - i).clamp(min=0)
    upper = (j > i).double()
    causal = 1.0 - upper
    prog = 1.0 - 0.5 * i / max(n - 1, 1)
    p_basic = -(sigma * delta) * upper
    p_prog = -(sigma * prog) * delta * upper
    p_static = 0.5 * p_basic + 0.5 * p_prog if progressive else p_basic
    slopes = torch.tensor([2.0 ** (-8.0 * (hh + 1) / h) for hh in range(h)], dtype=torch.float64)
    p_alibi = (
        -(delta * upper)[None] * slopes[:, None, None] if alibi else torch.zeros(h, n, n, dtype=torch.float64)
    )
    w = s * causal + p_static + p_alibi
    probs = torch.softmax(w, dim=-1) * causal
    return probs @ v, probs


@pytest.mark.parametrize(("alibi", "progressive"), [(True, True), (False, True), (True, False)])
def test_mode_a_equals_std_attention_times_sigmoid(alibi: bool, progressive: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h, n, d = 4, 12, 8
    q, k, v = (torch.randn(h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    ref_out, ref_probs = official_dense(q, k, v, SIGMA, alibi, progressive)
    # Standard causal attention and its LSE, then the library's per-row log R.
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(s, -1)
    out_std = torch.softmax(s, -1) @ v
    rows = torch.arange(n)
    log_r = row_log_r(rows, torch.tensor(n), h, SIGMA, alibi=alibi, progressive=progressive)  # [H, n]
    out = rescale(out_std, lse, log_r.double())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    kept = ref_probs.sum(-1)
    torch.testing.assert_close(rescale_factor(lse, log_r).double(), kept, rtol=1e-5, atol=1e-6)
    # Rows sum below 1, except the last row, which has no registers.
    assert bool((kept[:, :-1] < 1.0 - 1e-4).all())
    torch.testing.assert_close(kept[:, -1], torch.ones(h, dtype=torch.float64))


def test_mode_b_equals_sink_logit_attention() -> None:
    g = torch.Generator().manual_seed(1)
    h, n, d = 8, 10, 16
    q, k, v = (torch.randn(h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = sink_logits(h, SIGMA, alibi=True, progressive_c=0.875).double()
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    # Independent: append one sink column per head (logit log R_inf, value 0) and drop it after softmax.
    s_ext = torch.cat([s, sinks[:, None, None].expand(h, n, 1)], dim=-1)
    p_ext = torch.softmax(s_ext, -1)
    ref = p_ext[..., :n] @ v
    out = rescale(torch.softmax(s, -1) @ v, torch.logsumexp(s, -1), sinks[:, None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert bool((p_ext[..., :n].sum(-1) < 1.0).all())
    # Sink logit is log of the infinite geometric sum with a = sigma * c + m_h.
    a = SIGMA * 0.875 + alibi_slopes(h).double()
    torch.testing.assert_close(sinks, torch.log(torch.exp(-a) / (1 - torch.exp(-a))), rtol=1e-6, atol=1e-6)


def test_register_mass_closed_form_vs_sum() -> None:
    for a in (0.05, 0.6, 1.64, 5.0):
        for n in (0, 1, 2, 7, 300):
            explicit = sum(math.exp(-a * dd) for dd in range(1, n + 1))
            got = register_mass(torch.tensor(a, dtype=torch.float64), torch.tensor(n)).item()
            assert got == pytest.approx(explicit, rel=1e-9, abs=1e-300)
    assert log_register_mass(torch.tensor(math.inf), torch.tensor(5)).item() == -math.inf
    assert log_register_mass(torch.tensor(0.0), torch.tensor(4)).item() == pytest.approx(math.log(4))
    r_inf = register_mass(torch.tensor(0.8), torch.tensor(math.inf)).item()
    assert r_inf == pytest.approx(math.exp(-0.8) / (1 - math.exp(-0.8)))


def test_slopes_and_llava_range() -> None:
    assert alibi_slopes(4).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8])
    # LLaVA-1.5 (32 heads, sigma 0.8): a = 0.8 c + m_h. Spec: log R_inf in [-1.43, +0.19] over the
    # progressive range c in [0.75, 1]; hand values: c = 1, head 31 -> a = 0.8039 -> log R = -0.2105;
    # c = 0.75, head 31 -> a = 0.6039 -> +0.1873; head 0 (m = 2^-0.25) at c = 1 -> a = 1.6409 -> -1.4255.
    lr = sink_logits(32, SIGMA)
    assert lr[0].item() == pytest.approx(-1.4255, abs=2e-4)
    assert lr[-1].item() == pytest.approx(-0.2105, abs=2e-4)
    assert sink_logits(32, SIGMA, progressive_c=0.75)[-1].item() == pytest.approx(0.1873, abs=2e-4)
    assert bool((lr[1:] < lr[:-1]).logical_not().all())  # smaller slopes -> more register mass


def test_disabled_rescale_is_identity() -> None:
    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 3, 5, 8, generator=g)
    lse = torch.randn(2, 3, 5, generator=g)
    log_r = row_log_r(torch.arange(5), torch.tensor(5), 3, math.inf)
    assert torch.isinf(log_r).all()
    assert torch.equal(rescale(out, lse, log_r[None]), out)
    assert torch.isinf(sink_logits(3, math.inf)).all()


def test_row_log_r_pads_and_lengths() -> None:
    # Rows at or past the end have no registers; row i of length L has L - 1 - i of them.
    lr = row_log_r(torch.tensor([0, 3, 4, 9]), torch.tensor(5), 2, SIGMA)
    assert torch.isinf(lr[:, 2:]).all() and torch.isfinite(lr[:, :2]).all()
    a = SIGMA * (1 - 0.25 * 3 / 4) + 2**-4  # head 0 of 2
    assert lr[0, 1].item() == pytest.approx(-a, rel=1e-6)  # one register: R = e^-a
