"""Per-method overhead inside the vLLM engine, measured in one run against plain vLLM.

For each concurrency (requests submitted together to one ``LLM``) and method, the script times
``max_tokens=1`` (prefill + first token, i.e. TTFT of the batch) and ``max_tokens=1+N`` with
``ignore_eos`` and derives TPOT = (T(1+N) - T(1)) / N and throughput = requests·(1+N) / T(1+N).
Every configuration is warmed up once and timed ``--repeats`` times (median), the configurations
taking turns within each repeat. The same measurement
of plain requests is also run in a subprocess with the plugin disabled (``VLLM_PLUGINS``), which
gives the plugin's idle overhead. Ratios are printed as a Markdown table (and ``--json`` writes all).

    export PYTHONPATH=tests                         # the parity harness (tests/helpers)
    python benchmarks/engine_overhead.py            # tiny LLaVA on CPU, concurrency 1 and 16
    python benchmarks/engine_overhead.py --fixture qwen2_vl --concurrency 1 4 16 --new-tokens 64
    python benchmarks/engine_overhead.py --methods kvsmooth farsight-B farsight-B+kvsmooth  # a composition

A method name joined with ``+`` (``farsight-B+kvsmooth``) is the composition of those entries; its
row is compared with the sum of its parts' overheads when the parts are measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

METHODS: dict[str, Any] = {
    "plain": None,
    "kvsmooth": "kvsmooth",
    "farsight-B": {"method": "farsight", "mode": "B"},
    "farsight-C": {"method": "farsight", "mode": "C"},
    "prunehal": "prunehal",
    "scr": "scr",
}


def measure(
    fixture: str,
    methods: dict[str, Any],
    concurrency: list[int],
    new_tokens: int,
    repeats: int,
    reduce: Any = statistics.median,
):
    from helpers.parity import Case, engine, run_vllm
    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY

    rows = []
    with engine(fixture, max_num_seqs=max(concurrency), enable_prefix_caching=False) as llm:
        for n in concurrency:
            extra = {name: None if spec is None else {EXTRA_ARGS_KEY: spec} for name, spec in methods.items()}
            runs = {
                (name, m): [Case(fixture, i, max_tokens=m, extra_args=extra[name]) for i in range(n)]
                for name in methods
                for m in (1, 1 + new_tokens)
            }
            samples: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
            for cases in runs.values():
                run_vllm(llm, cases)  # warm-up
            for _ in range(repeats):  # round-robin, so drift of a shared machine hits every method alike
                for key, cases in runs.items():
                    start = time.perf_counter()
                    run_vllm(llm, cases)
                    samples[key].append(time.perf_counter() - start)
            for name in methods:
                first, total = (reduce(samples[name, m]) for m in (1, 1 + new_tokens))
                rows.append(
                    {
                        "concurrency": n,
                        "method": name,
                        "ttft_s": first,
                        "tpot_ms": 1000 * (total - first) / new_tokens,
                        "throughput_tok_s": n * (1 + new_tokens) / total,
                    }
                )
    return rows


def _without_plugin(args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child-plain", *sys.argv[1:]]
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def spec_of(name: str) -> Any:
    """The spec of a ``--methods`` entry: a name of :data:`METHODS`, or names joined by ``+``."""
    parts = name.split("+")
    if len(parts) == 1:
        return METHODS[name]
    return [METHODS[p] for p in parts]


def method_name(text: str) -> str:
    """argparse type of ``--methods``: known entries (besides plain), alone or joined by ``+``."""
    parts = text.split("+")
    if any(p not in METHODS or p == "plain" for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: use {list(METHODS)[1:]}, or several joined by '+'")
    return text


def sum_of_parts(rows: list[dict[str, Any]]) -> str:
    """Markdown: each composition's TPOT overhead against the sum of its parts' (same run)."""
    by = {(r["concurrency"], r["method"]): r for r in rows}
    lines = [
        "| concurrency | composition | TPOT / plain | parts' sum: 1 + sum(part TPOT / plain - 1) |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        parts = r["method"].split("+")
        plain = by.get((r["concurrency"], "plain"))
        if len(parts) < 2 or plain is None or any((r["concurrency"], p) not in by for p in parts):
            continue
        ratio = r["tpot_ms"] / plain["tpot_ms"]
        parts_sum = 1 + sum(by[r["concurrency"], p]["tpot_ms"] / plain["tpot_ms"] - 1 for p in parts)
        lines.append(f"| {r['concurrency']} | {r['method']} | {ratio:.3f} | {parts_sum:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def table(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> str:
    """Markdown: every row with its TPOT and throughput ratios against plain vLLM in the same run."""
    plain = {r["concurrency"]: r for r in rows if r["method"] == "plain"}
    lines = [
        "| concurrency | method | TTFT (s) | TPOT (ms) | tok/s "
        "| TTFT / plain | TPOT / plain | tok/s / plain |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    labelled = [(b, "plain, plugin disabled") for b in baseline] + [(r, r["method"]) for r in rows]
    for r, label in sorted(labelled, key=lambda x: x[0]["concurrency"]):
        ref = plain[r["concurrency"]]
        ttft_ratio = r["ttft_s"] / ref["ttft_s"]
        tpot_ratio = r["tpot_ms"] / ref["tpot_ms"]
        tput_ratio = r["throughput_tok_s"] / ref["throughput_tok_s"]
        lines.append(
            f"| {r['concurrency']} | {label} | {r['ttft_s']:.3f} | {r['tpot_ms']:.2f} "
            f"| {r['throughput_tok_s']:.0f} | {ttft_ratio:.3f} | {tpot_ratio:.3f} | {tput_ratio:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="llava", choices=("llava", "qwen2_vl"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_name,
        default=list(METHODS)[1:],
        help="besides plain; entries joined by '+' compose",
    )
    parser.add_argument("--json", default=None, help="also write all measurements to this file")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument(
        "--fastest", action="store_true", help="time = the fastest repeat, not the median (a shared machine)"
    )
    parser.add_argument("--child-plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reduce = min if args.fastest else statistics.median
    if args.child_plain:
        rows = measure(args.fixture, {"plain": None}, args.concurrency, args.new_tokens, args.repeats, reduce)
        print(json.dumps(rows))
        return
    baseline = _without_plugin(args)
    methods = {"plain": None, **{name: spec_of(name) for name in args.methods}}
    rows = measure(args.fixture, methods, args.concurrency, args.new_tokens, args.repeats, reduce)
    report = "\n".join(
        [
            f"engine overhead: {args.fixture}, {args.new_tokens} new tokens, "
            f"{reduce.__name__} of {args.repeats}, "
            f"{platform.machine()} with {os.cpu_count()} cores (CPU numbers are indicative)",
            "",
            table(rows, baseline),
            "",
            sum_of_parts(rows),
        ]
    )
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "no_plugin": baseline, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
