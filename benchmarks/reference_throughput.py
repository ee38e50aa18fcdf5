"""Generated tokens/s of the HF reference per method on a tiny fixture ("what users run today").

Greedy decoding of exactly ``--new-tokens`` tokens per prompt, KV cache on (FarSight mode A recomputes
without it, as the official code does), batches of distinct images and prompts with left padding. Each
configuration is warmed up once and timed ``--repeats`` times; the median is reported.

    python benchmarks/reference_throughput.py                     # tiny LLaVA, batch 1 and 8
    python benchmarks/reference_throughput.py --json out/ref.json --batch-sizes 1 8 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vllm_halluguard import reference
from vllm_halluguard.methods import METHODS as REGISTERED
from vllm_halluguard.tiny_models import load_hf, make_image

#: Methods timed in several settings (label -> spec); every other registered method runs its preset.
VARIANTS: dict[str, dict[str, Any]] = {
    "farsight": {f"farsight-{mode}": {"method": "farsight", "mode": mode} for mode in ("A", "B", "C")},
}
#: Benchmark label -> spec: none, then each method of ``vllm_halluguard.methods.METHODS``.
METHODS: dict[str, Any] = {"none": None}
for _name in REGISTERED:
    METHODS.update(VARIANTS.get(_name, {_name: {"method": _name}}))
PROMPTS = (
    "Describe the image.",
    "What is in the picture?",
    "Describe the image in detail, including colors and shapes.",
    "How many objects are there?",
)


def make_inputs(processor: Any, batch: int) -> dict[str, Any]:
    images = [make_image(i) for i in range(batch)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return reference.chat_inputs(processor, images, prompts)


def time_generate(model: Any, inputs: dict[str, Any], method: Any, new_tokens: int) -> float:
    pad = model.config.get_text_config().pad_token_id
    start = time.perf_counter()
    with torch.no_grad():
        out = reference.generate(
            model,
            inputs,
            method,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return elapsed


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_hf(args.fixture)
    rows = []
    for batch in args.batch_sizes:
        inputs = make_inputs(processor, batch)
        for name in args.methods:
            method = METHODS[name]
            time_generate(model, inputs, method, args.new_tokens)  # warm-up
            times = [time_generate(model, inputs, method, args.new_tokens) for _ in range(args.repeats)]
            median = statistics.median(times)
            rows.append(
                {
                    "fixture": args.fixture,
                    "method": name,
                    "batch": batch,
                    "new_tokens": args.new_tokens,
                    "prompt_tokens": int(inputs["input_ids"].shape[1]),
                    "seconds": median,
                    "tokens_per_s": batch * args.new_tokens / median,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixture", choices=["llava", "qwen2_vl"], default="llava")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args)
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "none"}
    print(f"# HF reference throughput, tiny {args.fixture}, {args.new_tokens} new tokens, greedy")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}")
    print("| method | batch | tokens/s | vs none |")
    print("|---|---:|---:|---:|")
    for r in rows:
        rel = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        print(f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | {rel} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
