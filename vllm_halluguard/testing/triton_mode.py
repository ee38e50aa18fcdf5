"""Run the GPU attention backend (Triton kernels) inside the CPU engine, in Triton's interpreter.

``python -m vllm_halluguard.testing.triton_mode --out FILE`` starts a tiny-fixture engine with
``HALLUGUARD_ATTENTION=triton`` and ``TRITON_INTERPRET=1``, generates a fixed set of plain and
mitigated requests and writes their tokens and top-k log-probs as JSON, together with the attention
backends the engine actually used. The tests compare that output with the dense reference, so the
GPU code path (builder, impl, kernel) is covered without a GPU. Both variables must be set before
vLLM and Triton are imported, hence a separate process.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

#: Cases run in Triton mode: (image seed, method spec).
CASES: tuple[tuple[int, Any], ...] = (
    (80, None),
    (81, "kvsmooth"),
    (82, {"method": "farsight", "mode": "B"}),
    (83, {"method": "farsight", "mode": "C"}),
    (84, "prunehal"),
    (85, "scr"),
)
MAX_TOKENS = 12


def backend_names(worker: Any) -> list[str]:
    """``collective_rpc`` helper: the attention backend classes of a worker's layers."""
    groups = worker.model_runner.attn_groups
    return sorted({g.backend.__module__ + "." + g.backend.__name__ for gs in groups for g in gs})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--fixtures", nargs="+", default=["llava", "qwen2_vl"])
    args = parser.parse_args(argv)
    os.environ["HALLUGUARD_ATTENTION"] = "triton"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY
    from vllm_halluguard.testing.parity import Case, engine, run_vllm

    result: dict[str, Any] = {}
    for fixture in args.fixtures:
        cases = [
            Case(fixture, seed, max_tokens=MAX_TOKENS, extra_args=None if s is None else {EXTRA_ARGS_KEY: s})
            for seed, s in CASES
        ]
        with engine(fixture, block_size=32) as llm:
            gens = run_vllm(llm, cases)
            (backends,) = llm.collective_rpc(backend_names)
        result[fixture] = {
            "backends": backends,
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
