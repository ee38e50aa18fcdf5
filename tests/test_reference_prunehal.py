"""PruneHal reference on the tiny fixtures: masking equals slicing, schedule, forced step-2 prune.

Step 1 is the prefill (its last query row seeds the history); step m >= 2 is the decode forward that
consumes generated token m - 1, so the forced prune at step 2 follows the first decode forward and token 3
is the first that can differ from the plain run.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from reference_fixtures import PROMPTS, family, greedy, inputs_for, tiny  # noqa: F401

N = 12


def test_masking_equals_slicing_with_explicit_positions() -> None:
    """Re-run the masked generation with pruned K/V rows physically removed from each layer's cache."""
    model, processor = tiny("llava")
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    ids = inputs["input_ids"]
    prompt_len = ids.shape[1]
    run = greedy(model, inputs, N, {"method": "prunehal", "r": 0.4, "t": 3})
    vis = torch.nonzero(ids[0] == model.config.image_token_id).flatten()
    n_layers = len(model.model.language_model.layers)
    keeps = [rec["keep"][0] for rec in run.ref.trace]  # keep mask after step m (index m - 1; 1 = prefill)
    assert any(not bool(k.all()) for k in keeps), "nothing was pruned"

    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        out = model(**inputs, past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1]]
        # Original sequence positions currently held by each layer's cache.
        held = [torch.arange(prompt_len) for _ in range(n_layers)]
        for step in range(1, N):  # decode forward `step` is PruneHal step step + 1
            keep = keeps[step - 1]  # the decision taken after PruneHal step `step`
            for layer in range(n_layers):
                pruned = set(vis[~keep[layer]].tolist())
                rows = torch.tensor([i for i, p in enumerate(held[layer].tolist()) if p not in pruned])
                lyr = cache.layers[layer]
                lyr.keys, lyr.values = lyr.keys[:, :, rows], lyr.values[:, :, rows]
                held[layer] = held[layer][rows]
            token = run.sequences[:, step - 1 : step]
            pos = prompt_len + step - 1  # absolute position: the cache is shorter than the sequence now
            out = model(
                input_ids=token,
                position_ids=torch.tensor([[pos]]),
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits[0, -1])
            for layer in range(n_layers):
                held[layer] = torch.cat([held[layer], torch.tensor([pos])])
    assert cache.layers[0].keys.shape[2] < prompt_len + N - 1  # really sliced
    sliced = torch.stack(logits)
    torch.testing.assert_close(sliced, run.logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(sliced.argmax(-1), run.sequences[0])


def test_schedule_and_forced_prune_on_fixture(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0, 1), PROMPTS)
    nv = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    r, t = 0.4, 3
    expected = [nv]
    for _ in range(t):
        expected.append(int(r * expected[-1] + 1e-9))
    base = greedy(model, inputs, N)
    run = greedy(model, inputs, N, {"method": "prunehal", "r": r, "t": t})
    trace = run.ref.trace
    assert [rec["step"] for rec in trace] == list(range(1, N + 1))  # the prefill and N - 1 decode steps
    assert not bool(trace[0]["fired"].any()) and bool(trace[1]["fired"].all())  # forced at step 2
    assert bool(trace[0]["keep"].all())  # the prefill only measures
    for rec in trace:
        kept = rec["kept"]
        assert bool((kept == kept[:, :1]).all())  # all layers keep the same count
        assert set(kept[:, 0].tolist()) <= set(expected)
    assert trace[1]["kept"][:, 0].tolist() == [expected[1]] * 2
    fired = torch.stack([rec["fired"] for rec in trace]).sum(0)
    assert bool((fired <= t).all())
    # The decision at step 2 (the first decode forward) applies from step 3, which produces token 3:
    # generated tokens 1-2 are untouched, the 3rd already sees the pruned cache.
    assert torch.equal(run.logits[:, :2], base.logits[:, :2])
    assert not torch.equal(run.logits[:, 2], base.logits[:, 2])


def test_pruned_keys_get_no_attention() -> None:
    model, processor = tiny("llava")
    inputs = inputs_for(processor, (4,), PROMPTS[:1])
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    rows: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if output[1].shape[2] == 1:
            rows.append(output[1][0, :, 0, vis].clone())  # [H, Nv] on decode steps

    layer0 = model.model.language_model.layers[0].self_attn
    handle = layer0.register_forward_hook(hook, with_kwargs=True)
    try:
        run = greedy(model, inputs, 6, {"method": "prunehal", "r": 0.4, "t": 1})
    finally:
        handle.remove()
    keep = run.ref.trace[1]["keep"][0, 0]  # layer 0 after the forced prune at step 2
    assert int(keep.sum()) == 25
    for step_rows in rows[1:]:  # decode forwards 2.. (steps 3..) use the pruned cache
        assert bool((step_rows[:, ~keep] == 0).all())
        assert bool((step_rows[:, keep] > 0).all())
    assert bool((rows[0] > 0).all())  # the first decode forward (step 2) still saw every visual token


def test_first_generated_token_that_differs_is_the_third(family: str) -> None:  # noqa: F811
    """The forced prune follows the first decode forward (step 2), so greedy token 3 can already differ."""
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0,), PROMPTS[:1])
    base = greedy(model, inputs, 4)
    run = greedy(model, inputs, 4, {"method": "prunehal", "r": 0.4, "t": 3})
    assert [int(rec["fired"][0]) for rec in run.ref.trace] == [0, 1, 0, 0]  # steps 1 (prefill) .. 4
    assert torch.equal(run.logits[:, :2], base.logits[:, :2])
    assert torch.equal(run.sequences[:, :2], base.sequences[:, :2])
    assert run.sequences[0, 2] != base.sequences[0, 2]  # the 3rd generated token
