"""Contracts every reference method must meet on both tiny fixtures.

* disabled parameters reproduce the baseline bit for bit (the hooks themselves change nothing);
* the enabled method changes the generation (so it is wired in);
* a left-padded batch gives each sample the same result as running it alone;
* attaching is undone on exit, also after an error.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_fixtures import PROMPTS, family, greedy, inputs_for, select, tiny  # noqa: F401
from vllm_halluguard import reference
from vllm_halluguard.methods import parse
from vllm_halluguard.reference.base import ATTN_IMPL

N = 10

ENABLED = {
    "kvsmooth": {"method": "kvsmooth"},
    "prunehal": {"method": "prunehal", "r": 0.4, "t": 3},
    "farsight_A": {"method": "farsight", "mode": "A"},
    "farsight_B": {"method": "farsight", "mode": "B"},
    "farsight_C": {"method": "farsight", "mode": "C"},
    "scr": {"method": "scr"},
}

DISABLED = {
    "kvsmooth": {"method": "kvsmooth", "lam_ref": 0.0, "clip": 0.0},
    "prunehal": {"method": "prunehal", "r": 1.0},
    "farsight_A": {"method": "farsight", "mode": "A", "sigma": math.inf},
    "farsight_B": {"method": "farsight", "mode": "B", "sigma": math.inf},
    "farsight_C": {"method": "farsight", "mode": "C", "sigma": math.inf},
    "scr_lam1": {"method": "scr", "lam": 1.0},
    "scr_k0": {"method": "scr", "top_k": 0},
}


def _batch(fam: str):
    model, processor = tiny(fam)
    return model, inputs_for(processor, (0, 1), PROMPTS)


@pytest.fixture(scope="module")
def baselines() -> dict:
    """Greedy baseline runs per fixture, with and without the KV cache."""
    out = {}
    for fam in ("llava", "qwen2_vl"):
        model, inputs = _batch(fam)
        out[fam, True] = greedy(model, inputs, N)
        out[fam, False] = greedy(model, inputs, N, use_cache=False)
    return out


@pytest.mark.parametrize("name", sorted(DISABLED))
def test_disabled_reproduces_baseline_exactly(family: str, name: str, baselines: dict) -> None:  # noqa: F811
    model, inputs = _batch(family)
    spec = DISABLED[name]
    assert parse(spec).is_noop()
    run = greedy(model, inputs, N, spec)
    base = baselines[family, not name.startswith("farsight_A")]  # mode A always recomputes
    assert torch.equal(run.sequences, base.sequences)
    assert torch.equal(run.logits, base.logits)


@pytest.mark.parametrize("name", sorted(ENABLED))
def test_enabled_changes_generation(family: str, name: str, baselines: dict) -> None:  # noqa: F811
    model, inputs = _batch(family)
    run = greedy(model, inputs, N, ENABLED[name])
    base = baselines[family, True]
    diff = (run.logits - base.logits).abs().amax(-1)  # [B, N]
    assert float(diff.max()) > 1e-2, diff
    if name in ("kvsmooth", "prunehal"):
        # Decode-only methods cannot touch the tokens produced before their first effect: KVSmooth
        # smooths from the first decode forward, PruneHal's forced prune follows it (step 2).
        first = 2
        assert torch.equal(run.logits[:, :first], base.logits[:, :first])


@pytest.mark.parametrize("name", sorted(ENABLED))
def test_padded_batch_equals_solo_runs(family: str, name: str) -> None:  # noqa: F811
    model, inputs = _batch(family)
    assert not bool(inputs["attention_mask"].all()), "the two prompts must have different lengths"
    batch = greedy(model, inputs, N, ENABLED[name])
    for i in range(2):
        solo = greedy(model, select(inputs, i, family), N, ENABLED[name])
        torch.testing.assert_close(batch.logits[i], solo.logits[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(batch.sequences[i], solo.sequences[0])


def test_apply_restores_model_even_on_error() -> None:
    model, _ = _batch("llava")
    cfg = model.model.language_model.config
    before = cfg._attn_implementation
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), reference.apply(model, "kvsmooth") as ref:
        assert cfg._attn_implementation == ATTN_IMPL
        assert ref.config.layers == (1, 2)  # resolved for the 4-layer model
        raise RuntimeError("boom")
    assert cfg._attn_implementation == before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert not any(
        hasattr(layer.self_attn, "_halluguard_method") for layer in model.model.language_model.layers
    )
    assert "generate" not in model.__dict__


def test_apply_none_and_errors() -> None:
    model, inputs = _batch("llava")
    with reference.apply(model, "none") as ref:
        assert ref is None
    with reference.apply(model, "scr"), pytest.raises(RuntimeError, match="already attached"):  # noqa: SIM117
        with reference.apply(model, "kvsmooth"):
            pass
    with pytest.raises(ValueError, match="unsupported model"):  # noqa: SIM117
        with reference.apply(torch.nn.Linear(2, 2), "kvsmooth"):
            pass
    with pytest.raises(ValueError, match="do not exist"):  # noqa: SIM117
        with reference.apply(model, {"method": "scr", "layers": [7]}):
            pass
    # Move each row's left padding to the right.
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    right = dict(inputs)
    for key in ("input_ids", "attention_mask"):
        right[key] = torch.stack([torch.roll(row, -p) for row, p in zip(inputs[key], pads, strict=True)])
    with pytest.raises(ValueError, match="left padding"):
        greedy(model, right, 2, "kvsmooth")
    for stateful in ("kvsmooth", "prunehal"):
        with pytest.raises(NotImplementedError, match="beam search"), reference.apply(model, stateful):
            model.generate(**inputs, max_new_tokens=2, num_beams=2)
    text_only = {
        "input_ids": torch.tensor([[1, 5, 6, 7]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    with pytest.raises(ValueError, match="needs image tokens"):
        greedy(model, text_only, 2, "scr")


def test_generate_helper_matches_context_manager() -> None:
    model, inputs = _batch("llava")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=3)
    a = reference.generate(model, inputs, {"method": "farsight", "mode": "B"}, **kw)
    with reference.apply(model, {"method": "farsight", "mode": "B"}):
        b = model.generate(**inputs, **kw)
    assert torch.equal(a, b)
    assert torch.equal(reference.generate(model, inputs, None, **kw), model.generate(**inputs, **kw))
