"""How many requests fit a KV-cache budget with PruneHal's reclaiming variant, measured in one run.

One in-process engine on the tiny LLaVA fixture (fp32, CPU, block size 32) with a KV pool sized to hold
``--fit`` plain requests at their full length. The same ``--requests`` image requests are submitted at
once for each configuration (plain; the paper's per-layer PruneHal, which frees nothing; the reclaiming
variant), and the engine is stepped to the end. Per configuration (mean over ``--repeats``, the order
rotating): the most and the mean number of requests running per step, preemptions, blocks given back
and output throughput. Prefix caching is off, so that no request shares blocks with another.

The prompt puts the 64 image tokens at positions 32..95 (a text prefix fills block 0), so two of the
prompt's four 32-token blocks are image-only; with 64 generated tokens a request needs 6 blocks, or 4
once the reclaim took the image blocks back.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=tests python benchmarks/prunehal_reclaim.py  # the table
    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=tests python benchmarks/prunehal_reclaim.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any

BLOCK = 32
CONFIGS: dict[str, Any] = {
    "plain": None,
    "prunehal (paper, per layer)": {"method": "prunehal", "r": 0.4, "t": 3},
    "prunehal reclaim (shared, block)": {
        "method": "prunehal", "r": 0.4, "t": 3, "selection": "shared", "granularity": "block", "block": BLOCK,
    },
}  # fmt: skip
QUESTION = "Describe the image."


def aligned_prompt(processor: Any, image: Any, image_id: int) -> str:
    """A LLaVA prompt whose image starts at a multiple of the block size (a filler text before it)."""
    for k in range(64):
        text = "Note: " + "see " * k + f"USER: <image>\n{QUESTION} ASSISTANT:"
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        if ids.index(image_id) % BLOCK == 0:
            return text
    raise RuntimeError("no filler length aligns the image with a block")


def run_config(llm: Any, prompts: list[dict[str, Any]], spec: Any, new_tokens: int) -> dict[str, Any]:
    """Submit every prompt at once, step to the end; running-request counts and throughput."""
    from vllm import SamplingParams

    from vllm_halluguard.engine import reclaim
    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY

    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    extra = None if spec is None else {EXTRA_ARGS_KEY: spec}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)
    freed0 = reclaim.scheduler_stats(core)["prunehal_freed_blocks"]
    ids = [f"{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for req_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(req_id, prompt, params)
    running: list[int] = []
    preempted: dict[str, int] = {}
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        running.append(len(scheduler.running))
        for req in scheduler.running:
            preempted[req.request_id] = req.num_preemptions
        tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    wall = time.perf_counter() - start
    return {
        "max_running": max(running),
        "mean_running": sum(running) / len(running),
        "steps": len(running),
        "preemptions": sum(preempted.values()),
        "freed_blocks": reclaim.scheduler_stats(core)["prunehal_freed_blocks"] - freed0,
        "wall_s": wall,
        "tokens": tokens,
        "tok_per_s": tokens / wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", type=int, default=4, help="plain requests the KV pool holds at full length")
    parser.add_argument("--requests", type=int, default=16, help="requests submitted at once")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.getLogger("vllm").setLevel(logging.WARNING)

    from transformers import AutoProcessor

    from helpers.parity import make_llm, shutdown_llm
    from vllm_halluguard.tiny_models import ensure_fixture, make_image

    processor = AutoProcessor.from_pretrained(ensure_fixture("llava"))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    images = [make_image(100 + i) for i in range(args.requests)]
    text = aligned_prompt(processor, images[0], image_id)
    ids = processor(text=[text], images=[images[0]], return_tensors="pt")["input_ids"][0]
    prompt_len = len(ids)
    per_request = math.ceil((prompt_len + args.new_tokens) / BLOCK)
    num_blocks = args.fit * per_request + 1  # + vLLM's null block
    llm = make_llm(
        "llava",
        enable_prefix_caching=False,  # the prompts share their text block: keep the arithmetic per request
        block_size=BLOCK,
        num_gpu_blocks_override=num_blocks,
        max_model_len=prompt_len + args.new_tokens,
        max_num_seqs=args.requests,
    )
    prompts = [{"prompt": text, "multi_modal_data": {"image": img}} for img in images]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    try:
        run_config(llm, prompts[:2], CONFIGS["prunehal reclaim (shared, block)"], 4)  # warm-up
        names = list(CONFIGS)
        for rep in range(args.repeats):  # the order rotates per repeat
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                results[name].append(run_config(llm, prompts, CONFIGS[name], args.new_tokens))
    finally:
        shutdown_llm(llm)

    first_image = int(ids.tolist().index(image_id))
    print(
        f"\nprompt {prompt_len} tokens (image at {first_image}..{first_image + 63}), {args.new_tokens} new "
        f"tokens, {per_request} blocks of {BLOCK} per plain request; pool {num_blocks - 1} blocks "
        f"(fits {args.fit}); {args.requests} requests at once\n"
    )
    cols = ["max running", "mean running", "engine steps", "preemptions", "blocks freed", "tok/s", "vs plain"]
    print("| config | " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|---|")
    base = sum(r["tok_per_s"] for r in results["plain"]) / len(results["plain"])
    for name, runs in results.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        cells = [
            f"{mean['max_running']:.0f}", f"{mean['mean_running']:.2f}", f"{mean['steps']:.0f}",
            f"{mean['preemptions']:.0f}",
            f"{mean['freed_blocks']:.0f}", f"{mean['tok_per_s']:.1f}", f"{mean['tok_per_s'] / base:.2f}x",
        ]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        setup = {"prompt_len": prompt_len, "pool_blocks": num_blocks - 1, "per_request_blocks": per_request}
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "setup": setup, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
