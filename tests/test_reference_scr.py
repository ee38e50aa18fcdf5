"""SCR reference on the tiny fixtures: diagnostic map, residual edits at every layer of the range."""

from __future__ import annotations

import pytest
import torch

from reference_fixtures import PROMPTS, family, greedy, inputs_for, tiny  # noqa: F401
from vllm_halluguard.methods.scr import border_mask


def _layer_outputs(layers, store: dict[int, list[torch.Tensor]]):
    def make(idx: int):
        def hook(module, args, output):
            store[idx].append((output[0] if isinstance(output, tuple) else output).clone())

        return hook

    return [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]


def test_edit_at_every_layer_of_the_range(family: str) -> None:  # noqa: F811
    model, processor = tiny(family)
    inputs = inputs_for(processor, (0, 1), PROMPTS)
    layers = model.model.language_model.layers
    vis = torch.nonzero(inputs["input_ids"] == model.config.image_token_id)[:, 1].view(2, -1)
    spec = {"method": "scr", "lam": 1.1, "top_k": 4, "layers": [0, 1], "diag_layers": [2]}
    pre: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    post: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = _layer_outputs(layers, pre)  # registered first: sees the layer's own output
    from vllm_halluguard import reference

    try:
        with torch.no_grad(), reference.apply(model, spec) as ref:
            handles += _layer_outputs(layers, post)  # registered after the method: sees the edit
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    rec = ref.trace[0]
    sources, owner = rec["sources"], rec["owner"]
    assert bool((sources >= 0).all()) and bool((owner >= 0).any())
    # Forward order: diagnostic (layers 0..2, then stopped), prefill, 2 decode steps.
    assert [len(pre[i]) for i in range(len(layers))] == [4, 4, 4, 3]
    # The diagnostic stops inside layer 2's hooks: the later hook never sees that call.
    assert [len(post[i]) for i in range(len(layers))] == [4, 4, 3, 3]
    post[2].insert(0, pre[2][0])
    for layer in range(len(layers)):
        for call, (a, b) in enumerate(zip(pre[layer], post[layer], strict=True)):
            if call != 1 or layer not in (0, 1):  # only the real prefill is edited, only in range
                assert torch.equal(a, b), (layer, call)
                continue
            for s in range(2):
                h_in, h_out = a[s, vis[s]], b[s, vis[s]]  # [Nv, D] visual rows
                expected = h_in.clone()
                for k in sources[s].tolist():
                    expected[k] = h_in[k] / 1.1
                for n, src in enumerate(owner[s].tolist()):
                    if src >= 0:
                        expected[n] = h_in[n] + 0.1 * h_in[src]
                torch.testing.assert_close(h_out, expected, rtol=1e-6, atol=1e-6)
                other = torch.ones(a.shape[1], dtype=torch.bool)
                other[vis[s]] = False
                assert torch.equal(a[s, other], b[s, other])  # text rows untouched


@pytest.mark.parametrize("diag_rows", ["text_after_image", "last"])
def test_sources_follow_the_text_to_image_attention(family: str, diag_rows: str) -> None:  # noqa: F811
    """Recompute the diagnostic map from a plain eager forward and compare the chosen sources."""
    model, processor = tiny(family)
    inputs = inputs_for(processor, (5, 6), PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    vis = torch.nonzero(ids == model.config.image_token_id)[:, 1].view(2, -1)
    diag = [1, 2]
    maps: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        probs = output[1]  # [B, H, T, T] eager attention weights
        per_sample = []
        for s in range(2):
            rows = [t for t in range(ids.shape[1]) if t > int(vis[s].max()) and mask[s, t]]
            if diag_rows == "last":
                rows = [ids.shape[1] - 1]
            per_sample.append(probs[s][:, rows][:, :, vis[s]].mean(dim=(0, 1)))
        maps.append(torch.stack(per_sample))

    layers = model.model.language_model.layers
    handles = [layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in diag]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    attn_map = torch.stack(maps).mean(0)  # [B, Nv]
    spec = {"method": "scr", "top_k": 3, "diag_layers": diag, "layers": [0], "diag_rows": diag_rows}
    run = greedy(model, inputs, 2, spec)
    rec = run.ref.trace[0]
    torch.testing.assert_close(rec["attn_map"], attn_map, rtol=1e-5, atol=1e-7)
    for s in range(2):
        border = border_mask(rec["grids"][s])
        interior = [p for p in range(vis.shape[1]) if not border[p]]
        top = sorted(interior, key=lambda p: -attn_map[s, p].item())[:3]
        assert rec["sources"][s].tolist() == top


def test_qwen2_vl_grid_from_positions() -> None:
    model, processor = tiny("qwen2_vl")
    inputs = inputs_for(processor, (0, 1), PROMPTS)
    run = greedy(model, inputs, 1, "scr")
    assert run.ref.trace[0]["grids"] == [(1, 4, 4), (1, 4, 4)]  # 112 px -> (1, 8, 8) patches, merged 2x2
    tiny_llava = greedy(tiny("llava")[0], inputs_for(tiny("llava")[1], (0,), PROMPTS[:1]), 1, "scr")
    assert tiny_llava.ref.trace[0]["grids"] == [(1, 8, 8)]
