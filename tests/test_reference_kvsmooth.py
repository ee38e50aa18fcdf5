"""KVSmooth reference on the tiny fixtures: decode only, after attention, recursive EMA of the cache."""

from __future__ import annotations

import pytest
import torch

from reference_fixtures import PROMPTS, family, greedy, inputs_for, tiny  # noqa: F401

N = 8


def test_prompt_cache_untouched_and_first_tokens_unchanged(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0, 1), PROMPTS)
    prompt_len = inputs["input_ids"].shape[1]
    base = greedy(model, inputs, N)
    run = greedy(model, inputs, N, {"method": "kvsmooth"})
    for layer in range(len(model.model.language_model.layers)):
        for attr in ("keys", "values"):
            a = getattr(run.cache.layers[layer], attr)[:, :, :prompt_len]
            b = getattr(base.cache.layers[layer], attr)[:, :, :prompt_len]
            assert torch.equal(a, b), (layer, attr)
    # Token 1 comes from the prefill; token 2 from a decode step that attends before smoothing.
    assert torch.equal(run.logits[:, :2], base.logits[:, :2])
    assert torch.equal(run.sequences[:, :2], base.sequences[:, :2])


@pytest.mark.parametrize("recursive", [True, False])
def test_cache_holds_the_ema_of_raw_slots(family: str, recursive: bool) -> None:  # noqa: F811
    """Capture each decode step's raw K/V slot before the method edits it; check the final cache."""
    model, processor = tiny(family)
    inputs = inputs_for(processor, (2, 3), PROMPTS)
    prompt_len = inputs["input_ids"].shape[1]
    layers = model.model.language_model.layers
    raw: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(layers))}

    def capture(idx: int):
        def hook(module, args, kwargs, output):
            if kwargs["hidden_states"].shape[1] == 1:  # decode step
                cache = kwargs["past_key_values"].layers[idx]
                raw[idx].append((cache.keys[:, :, -1].clone(), cache.values[:, :, -1].clone()))

        return hook

    # Registered before the method attaches, so they run before its own hooks.
    handles = [
        layer.self_attn.register_forward_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        run = greedy(model, inputs, N, {"method": "kvsmooth", "recursive": recursive})
    finally:
        for h in handles:
            h.remove()
    smoothed = run.ref.config.layers
    assert smoothed == (1, 2)
    lam = torch.stack([rec["lam"] for rec in run.ref.trace])  # [steps, B, n_layers]
    assert lam.shape == (N - 1, 2, 2)
    # lambda is clipped to 0.9 +- 0.2 and the strict rank over 15 never reaches 1.
    assert bool((lam >= 0.7 - 1e-6).all()) and bool((lam <= 14 / 15 + 1e-6).all())
    assert torch.allclose(lam[0], torch.full_like(lam[0], 0.7))  # first step: rank 0 -> lower clip
    for layer in range(len(layers)):
        cache = run.cache.layers[layer]
        prev_k = cache.keys[:, :, prompt_len - 1]
        prev_v = cache.values[:, :, prompt_len - 1]
        prev_raw = (prev_k, prev_v)
        for step in range(N - 1):
            pos = prompt_len + step
            k_raw, v_raw = raw[layer][step]
            if layer in smoothed:
                w = lam[step, :, smoothed.index(layer)].view(-1, 1, 1)
                ref_k, ref_v = (prev_k, prev_v) if recursive else prev_raw
                exp_k = (1 - w) * k_raw + w * ref_k
                exp_v = (1 - w) * v_raw + w * ref_v
            else:
                exp_k, exp_v = k_raw, v_raw
            torch.testing.assert_close(cache.keys[:, :, pos], exp_k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(cache.values[:, :, pos], exp_v, rtol=1e-6, atol=1e-6)
            prev_k, prev_v = cache.keys[:, :, pos], cache.values[:, :, pos]
            prev_raw = (k_raw, v_raw)


def test_entropy_rank_drives_lambda() -> None:
    """With clip = 1 the weight is the raw rank: it must follow the entropy recorded per step."""
    model, processor = tiny("llava")
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    layers = model.model.language_model.layers
    ent: list[float] = []

    def hook(module, args, kwargs, output):
        probs = output[1]
        if probs.shape[2] == 1:
            p = probs[0, :, 0].double()
            ent.append(float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean()))

    handle = layers[1].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        run = greedy(model, inputs, 20, {"method": "kvsmooth", "lam_ref": 0.5, "clip": 1.0, "layers": [1]})
    finally:
        handle.remove()
    lam = [float(rec["lam"][0, 0]) for rec in run.ref.trace]
    for t, z in enumerate(ent):
        window = ent[max(0, t - 14) : t + 1]
        assert lam[t] == pytest.approx(sum(v < z for v in window) / 15, abs=1e-6), t


def test_first_token_not_smoothed_when_disabled() -> None:
    model, processor = tiny("qwen2_vl")
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    prompt_len = inputs["input_ids"].shape[1]
    base = greedy(model, inputs, 3)
    run = greedy(model, inputs, 3, {"method": "kvsmooth", "smooth_first_token": False})
    lam = [rec["lam"] for rec in run.ref.trace]
    assert bool((lam[0] == 0).all()) and bool((lam[1] > 0).all())
    # Slot of the first generated token holds its raw K/V: same as the baseline's.
    for layer in (1, 2):
        assert torch.equal(
            run.cache.layers[layer].keys[:, :, prompt_len], base.cache.layers[layer].keys[:, :, prompt_len]
        )
