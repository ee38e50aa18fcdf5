"""Run the GPU code path (mitigated rows reworked by the Triton kernel) inside the CPU engine.

``PYTHONPATH=tests python -m helpers.triton_mode --out FILE`` starts a tiny-fixture engine with
``HALLUGUARD_ATTENTION=triton`` and ``TRITON_INTERPRET=1``: vLLM's native ``CPU_ATTN`` kernel serves
the plain rows, the project's Triton kernel (interpreted) the mitigated rows it reworks, as on a GPU.
It generates a fixed batch of plain and mitigated requests (one mixed batch) and writes their tokens
and top-k log-probs as JSON, with the attention backends the engine used and the worker's counters
(``kernel_rows``: rows the kernel computed; with ``HALLUGUARD_VERIFY_NATIVE=1``, set here, the
native rows checked bit for bit against the native kernel over the whole batch), and the kernel's
specialisations the run launched beside those the start-up warm-up lists for the engine's layers.
The tests compare the output with the dense reference. The variables must be set before vLLM and
Triton are imported, hence a separate process.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def reclaim(block: int) -> dict[str, Any]:
    """PruneHal's reclaiming variant at the engine's block size: on llava the image-only block is freed
    and nulled in the block table."""
    return {
        "method": "prunehal",
        "r": 0.3,
        "t": 1,
        "selection": "shared",
        "granularity": "block",
        "block": block,
    }


def mixed_cases(block: int) -> tuple[tuple[int, Any], ...]:
    """One mixed batch of (image seed, method spec): plain, every method, FarSight's two modes, the
    reclaiming PruneHal at ``block`` and two compositions (a decode row with FarSight's sinks, PruneHal's
    mask and KVSmooth's entropy in one launch; SCR's edit with FarSight's prompt-row sinks)."""
    return (
        (80, None),
        (81, "kvsmooth"),
        (82, {"method": "farsight", "mode": "B"}),
        (83, {"method": "farsight", "mode": "C"}),
        (84, "prunehal"),
        (85, "scr"),
        (86, reclaim(block)),
        (87, [{"method": "farsight", "mode": "B"}, "kvsmooth", {"method": "prunehal", "r": 0.5}]),
        (88, ["scr", {"method": "farsight", "mode": "C"}]),
    )


#: Cases run in Triton mode (the shared engines' block size, 32).
CASES = mixed_cases(32)
MAX_TOKENS = 12


def backend_names(worker: Any) -> list[str]:
    """``collective_rpc`` helper: the attention backend classes of a worker's layers."""
    groups = worker.model_runner.attn_groups
    return sorted({g.backend.__module__ + "." + g.backend.__name__ for gs in groups for g in gs})


def warmup_keys(worker: Any) -> list[str]:
    """``collective_rpc`` helper: the kernel specialisations the start-up warm-up lists for this worker's
    layers (on CPU it only lists them; on a GPU worker it compiles them)."""
    from vllm_halluguard.engine.warmup import warm_up

    return sorted(repr(key) for key in warm_up(worker.model_runner, mode="record"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--fixtures", nargs="+", default=["llava", "qwen2_vl"])
    args = parser.parse_args(argv)
    os.environ["HALLUGUARD_ATTENTION"] = "triton"
    os.environ["HALLUGUARD_VERIFY_NATIVE"] = "1"
    # vLLM's CPU kernel splits a row's keys over threads depending on the rest of the batch; without
    # the split it is batch-invariant, so the native rows can be checked bit for bit.
    os.environ.setdefault("VLLM_CPU_ATTN_SPLIT_KV", "0")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from helpers.parity import Case, engine, run_vllm
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY
    from vllm_halluguard.engine.runtime import worker_stats
    from vllm_halluguard.kernels.triton_attention import record_launches

    result: dict[str, Any] = {}
    for fixture in args.fixtures:
        cases = [
            Case(fixture, seed, max_tokens=MAX_TOKENS, extra_args=None if s is None else {EXTRA_ARGS_KEY: s})
            for seed, s in CASES
        ]
        with engine(fixture, block_size=32) as llm:
            with record_launches() as launched:  # the worker runs in this process
                gens = run_vllm(llm, cases)
            (backends,) = llm.collective_rpc(backend_names)
            (stats,) = llm.collective_rpc(worker_stats)
            (warmed,) = llm.collective_rpc(warmup_keys)
        result[fixture] = {
            "backends": backends,
            "stats": stats,
            "kernel_keys": sorted(repr(key) for key in launched),
            "warmup_keys": warmed,
            "gens": [
                {
                    "token_ids": g.token_ids,
                    "logprobs": [{str(k): v for k, v in s.items()} for s in g.logprobs],
                }
                for g in gens
            ],
        }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
