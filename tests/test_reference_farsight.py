"""FarSight reference on the tiny fixtures against independent dense oracles of modes A and B."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from reference_fixtures import PROMPTS, family, greedy, inputs_for, tiny  # noqa: F401

SIGMA = math.log(256) / math.log(1024)
N = 6


def _registers(h: int, n: int) -> torch.Tensor:
    """Official patch register logits P [H, n, n] for a length-n sequence (0 on and below the diagonal)."""
    i = torch.arange(n, dtype=torch.float32)[:, None]
    j = torch.arange(n, dtype=torch.float32)[None, :]
    delta = (j - i).clamp(min=0)
    prog = 1.0 - 0.5 * i / max(n - 1, 1)
    static = 0.5 * (-SIGMA * delta) + 0.5 * (-SIGMA * prog * delta)
    slopes = torch.tensor([2.0 ** (-8.0 * (hh + 1) / h) for hh in range(h)])
    return static[None] - delta[None] * slopes[:, None, None]


def _oracle(kind: str):
    """Dense attention: 'A' = official patch (softmax over s*C + P, times C); 'B' = per-head sink column."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        b, h, q, _ = query.shape
        t = key.shape[2]
        s = query @ key.transpose(2, 3) * scaling
        if kind == "A":
            assert q == t and b == 1, "oracle A: batch 1, no cache"
            causal = torch.ones(q, t, dtype=torch.bool).tril()
            w = torch.where(causal, s, 0.0) + _registers(h, t)
            probs = torch.softmax(w, dim=-1) * causal
        else:
            s = s + attention_mask
            a = SIGMA + torch.tensor([2.0 ** (-8.0 * (hh + 1) / h) for hh in range(h)])
            sink = torch.log(torch.exp(-a) / (1 - torch.exp(-a)))
            ext = torch.cat([s, sink.view(1, h, 1, 1).expand(b, h, q, 1)], dim=-1)
            probs = torch.softmax(ext, dim=-1)[..., :t]
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


@contextlib.contextmanager
def oracle(model, kind: str):
    name = f"test_farsight_oracle_{kind}"
    AttentionInterface.register(name, _oracle(kind))
    AttentionMaskInterface.register(name, eager_mask)
    cfg = model.model.language_model.config
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = name
    try:
        yield
    finally:
        cfg._attn_implementation_internal = saved


def test_mode_a_matches_official_dense_oracle(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    with oracle(model, "A"):
        expected = greedy(model, inputs, N, use_cache=False)
    run = greedy(model, inputs, N, {"method": "farsight", "mode": "A"})  # use_cache=True is overridden
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(run.sequences, expected.sequences)
    base = greedy(model, inputs, N)
    assert float((run.logits - base.logits).abs().max()) > 1e-2


def test_mode_b_matches_sink_oracle(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0, 1), PROMPTS)
    with oracle(model, "B"):
        expected = greedy(model, inputs, N)
    run = greedy(model, inputs, N, {"method": "farsight", "mode": "B"})
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_mode_c_is_mode_a_on_the_prompt_then_plain(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    run_c = greedy(model, inputs, 3, {"method": "farsight", "mode": "C"})
    run_a = greedy(model, inputs, 1, {"method": "farsight", "mode": "A"})
    torch.testing.assert_close(run_c.logits[:, 0], run_a.logits[:, 0], rtol=1e-5, atol=1e-5)


def _row_sums(model, inputs, spec, n):
    """Sum of each attention row (layer 0) returned by the method, per forward."""
    sums: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        sums.append(output[1].sum(-1).clone())  # [B, H, q]

    layer0 = model.model.language_model.layers[0].self_attn
    handle = layer0.register_forward_hook(hook, with_kwargs=True)
    try:
        greedy(model, inputs, n, spec)
    finally:
        handle.remove()
    return sums


@pytest.mark.parametrize("mode", ["A", "B", "C"])
def test_rows_sum_below_one_despite_eager_mask(mode: str) -> None:
    """The additive causal/padding mask must not wipe the registers (the official patch's pitfall)."""
    model, processor = tiny("llava")
    inputs = inputs_for(processor, (0, 1), PROMPTS)  # left-padded: a 4-D eager mask is in play
    real = inputs["attention_mask"].bool()
    sums = _row_sums(model, inputs, {"method": "farsight", "mode": mode}, 3)
    prefill = sums[0]  # [B, H, T]
    for b in range(2):
        rows = prefill[b][:, real[b]]
        if mode == "B":
            assert bool((rows < 1 - 1e-4).all())
        else:  # every prompt row but the last has registers
            assert bool((rows[:, :-1] < 1 - 1e-4).all())
            torch.testing.assert_close(rows[:, -1], torch.ones_like(rows[:, -1]))
    decode = sums[-1]
    if mode == "B":
        assert bool((decode < 1 - 1e-4).all())
    elif mode == "C":
        torch.testing.assert_close(decode, torch.ones_like(decode))  # generated rows: no registers
    else:  # mode A recomputes: the newest row is the last one, the older ones keep registers
        assert decode.shape[-1] == prefill.shape[-1] + 2


def test_mode_a_refuses_cached_decode() -> None:
    model, processor = tiny("llava")
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    from vllm_halluguard import reference

    with reference.apply(model, {"method": "farsight", "mode": "A"}), torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(RuntimeError, match="recomputes"):
            model(
                input_ids=out.logits[:, -1:].argmax(-1),
                attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
