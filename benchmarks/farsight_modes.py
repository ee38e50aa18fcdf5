"""How close FarSight's serving modes B and C are to the official mode A (dense HF reference).

For every model and image, mode A (the official code: no KV cache, registers over the current length,
every row recomputed each step) generates ``--steps`` greedy tokens. Modes B (a per-head sink on every
row) and C (registers on prompt rows only) and the plain model are then

* teacher-forced on A's tokens: ``max |dlogp|`` is the largest difference of their log-softmax to A's over
  the whole vocabulary and every step (``mean`` averages the per-step maxima);
* run greedily on their own: ``same`` counts the positions whose token equals A's, ``first`` is the first
  differing token (1-based; ``-`` when all agree).

Models: the two tiny fixtures (random weights, so small logit gaps and early greedy splits) and the
trained testbed captioner (committed weights). Usage::

    PYTHONPATH=tests python benchmarks/farsight_modes.py --images 4 --steps 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from testbed import measure as tb
from testbed import scenes as sc
from vllm_halluguard import reference
from vllm_halluguard.tiny_models import load_hf, make_image

MODES = {"B": {"method": "farsight", "mode": "B"}, "C": {"method": "farsight", "mode": "C"}, "plain": None}


class _Force(LogitsProcessor):
    """Teacher forcing: only the next token of ``tokens`` survives (raw logits are recorded before)."""

    def __init__(self, tokens: list[int], prompt_len: int) -> None:
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -torch.inf)
        forced[:, self.tokens[step]] = 0.0
        return forced


def generate(
    model: Any, inputs: dict[str, Any], spec: Any, steps: int, force: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Greedy (or forced) tokens of a batch-1 input and the log-softmax of each step ``[steps, V]``."""
    prompt_len = inputs["input_ids"].shape[1]
    procs = LogitsProcessorList([_Force(force, prompt_len)]) if force is not None else None
    with torch.no_grad(), reference.apply(model, spec):
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=True,  # mode A's reference overrides this (it recomputes every step)
            logits_processor=procs,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.get_text_config().pad_token_id,
        )
    logp = torch.log_softmax(torch.stack([lg[0] for lg in out.logits]).float(), dim=-1)
    return out.sequences[0, prompt_len:].tolist(), logp


@dataclass
class Row:
    model: str
    mode: str
    max_dlogp: float
    mean_dlogp: float
    same: int
    first: int | None  # first differing token, 1-based


def compare(name: str, model: Any, inputs: dict[str, Any], steps: int) -> list[Row]:
    """One image: A's greedy run, then B, C and plain forced on A's tokens and free."""
    tokens_a, logp_a = generate(model, inputs, {"method": "farsight", "mode": "A"}, steps)
    rows = []
    for mode, spec in MODES.items():
        _, logp = generate(model, inputs, spec, steps, force=tokens_a)
        dmax = (logp - logp_a).abs().amax(-1)  # [steps]
        tokens, _ = generate(model, inputs, spec, steps)
        diff = [i for i, (a, b) in enumerate(zip(tokens_a, tokens, strict=True)) if a != b]
        same = sum(a == b for a, b in zip(tokens_a, tokens, strict=True))
        rows.append(
            Row(name, mode, float(dmax.max()), float(dmax.mean()), same, diff[0] + 1 if diff else None)
        )
    return rows


def fixture_inputs(fixture: str, n_images: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    model, processor = load_hf(fixture)
    model.eval()
    for seed in range(n_images):
        yield model, reference.chat_inputs(processor, [make_image(seed)], ["Describe the image."])


def testbed_inputs(n_images: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    model, processor = tb.load()
    cfg = sc.trained_config(tb.MODEL_DIR)
    size = model.config.vision_config.image_size
    half = (n_images + 1) // 2  # probe scenes (an anchor without its partner) and control scenes
    scenes = sc.sample_scenes("probe", half, cfg) + sc.sample_scenes("control", n_images - half, cfg)
    text = tb.chat_prompt(processor)
    for scene in scenes:
        yield model, dict(processor(text=[text], images=[sc.render(scene, size)], return_tensors="pt"))


def summarise(rows: list[Row], steps: int) -> list[str]:
    """Markdown table: per model and mode, the worst and mean image."""
    out = [
        f"| model | mode | max \\|Δlogp\\| (worst image) | mean per-step max | same tokens / {steps} "
        "(mean, min) | first divergence (earliest; per image) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for model in dict.fromkeys(r.model for r in rows):
        for mode in MODES:
            sel = [r for r in rows if r.model == model and r.mode == mode]
            firsts = [r.first for r in sel]
            earliest = min((f for f in firsts if f is not None), default=None)
            out.append(
                f"| {model} | {mode} | {max(r.max_dlogp for r in sel):.3f} | "
                f"{statistics.mean(r.mean_dlogp for r in sel):.3f} | "
                f"{statistics.mean(r.same for r in sel):.1f}, {min(r.same for r in sel)} | "
                f"{earliest if earliest is not None else '-'}; "
                f"{', '.join(str(f) if f is not None else '-' for f in firsts)} |"
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per model")
    parser.add_argument("--steps", type=int, default=32, help="generated tokens per image")
    parser.add_argument("--models", nargs="+", default=["llava", "qwen2_vl", "testbed"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows: list[Row] = []
    for name in args.models:
        t0 = time.perf_counter()
        source = testbed_inputs(args.images) if name == "testbed" else fixture_inputs(name, args.images)
        for model, inputs in source:
            rows += compare(name, model, inputs, args.steps)
        print(f"# {name}: {args.images} images in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in rows:
        print(
            f"{r.model:9s} {r.mode:5s} max={r.max_dlogp:.4f} mean={r.mean_dlogp:.4f} "
            f"same={r.same} first={r.first}"
        )
    print()
    print("\n".join(summarise(rows, args.steps)))


if __name__ == "__main__":
    main()
