"""Per-method overhead inside the vLLM engine, against plain vLLM with and without the plugin, in one run.

Two engines of the same fixture run in two subprocesses: one with the plugin, one where vLLM loads no
plugin (``VLLM_PLUGINS=none``). A driver sends them the same batches in turn, so drift on a shared
machine hits every configuration alike: within each repeat and concurrency, the plugin-free engine's
plain batch, then the plugin engine's plain batch and one batch per method.

Each request's TTFT and TPOT come from its own streamed token timestamps, which vLLM records per
request when its stats are on (``RequestOutput.metrics``): TTFT = first token − arrival, TPOT =
(last token − first token) / (tokens − 1). A batch's value is the median over its requests; a ratio
is taken within one repeat (method / plain of the same engine; plain with the plugin / plain without),
and the table prints the median ratio over the repeats with its spread (min–max) beside it.

    python benchmarks/engine_overhead.py                    # tiny LLaVA on CPU, concurrency 1 and 16
    python benchmarks/engine_overhead.py --fixture qwen2_vl --concurrency 1 4 16 --new-tokens 64
    python benchmarks/engine_overhead.py --methods kvsmooth farsight-B farsight-B+kvsmooth  # a composition

A method name joined with ``+`` (``farsight-B+kvsmooth``) is the composition of those entries; its
row is compared with the sum of its parts' overheads when the parts are measured too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

METHODS: dict[str, Any] = {
    "plain": None,
    "kvsmooth": "kvsmooth",
    "farsight-B": {"method": "farsight", "mode": "B"},
    "farsight-C": {"method": "farsight", "mode": "C"},
    "prunehal": "prunehal",
    "scr": "scr",
}
#: The label of plain requests on the engine without the plugin.
NO_PLUGIN = "plain, plugin disabled"
#: ``(concurrency, label) -> [(ttft_s, tpot_s) per repeat]``.
Samples = dict[tuple[int, str], list[tuple[float, float]]]


def request_times(output: Any) -> tuple[float, float | None]:
    """``(ttft_s, tpot_s)`` of one finished request from vLLM's per-request stats (``tpot`` is None for
    a single token)."""
    m = output.metrics
    if m is None:
        raise RuntimeError("the engine records no per-request stats (start it with disable_log_stats=False)")
    tpot = (
        (m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
        if m.num_generation_tokens > 1
        else None
    )
    return m.first_token_latency, tpot


def _serve(conn: Any, fixture: Any, plugin: bool, max_num_seqs: int) -> None:
    """Subprocess: one engine, serving ``(spec, n, new_tokens)`` batches until told ``None``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not plugin:
        os.environ["VLLM_PLUGINS"] = "none"
    from transformers import AutoProcessor

    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY
    from vllm_halluguard.parity import Case, make_llm, sampling_params, vllm_inputs
    from vllm_halluguard.tiny_models import ensure_fixture

    llm = make_llm(fixture, max_num_seqs=max_num_seqs, enable_prefix_caching=False, disable_log_stats=False)
    processor = AutoProcessor.from_pretrained(ensure_fixture(fixture))
    conn.send("ready")
    while (job := conn.recv()) is not None:
        spec, n, new_tokens = job
        extra = None if spec is None else {EXTRA_ARGS_KEY: spec}
        cases = [Case(fixture, i, max_tokens=new_tokens, extra_args=extra) for i in range(n)]
        outs = llm.generate(
            [vllm_inputs(processor, c) for c in cases], [sampling_params(c) for c in cases], use_tqdm=False
        )
        conn.send([request_times(o) for o in outs])


class Engine:
    """An engine in a subprocess (:func:`_serve`)."""

    def __init__(self, fixture: str, plugin: bool, max_num_seqs: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fixture, plugin, max_num_seqs), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("engine subprocess did not start")

    def run(self, spec: Any, n: int, new_tokens: int) -> tuple[float, float]:
        """Median TTFT and TPOT (seconds) over a batch of ``n`` requests with ``spec``."""
        self.conn.send((spec, n, new_tokens))
        times = self.conn.recv()
        return statistics.median(t for t, _ in times), statistics.median(p for _, p in times if p is not None)

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)


def measure(
    fixture: str, methods: dict[str, Any], concurrency: list[int], new_tokens: int, repeats: int
) -> Samples:
    """``(concurrency, label) -> [(ttft_s, tpot_s) per repeat]``; ``label`` is a method name or
    :data:`NO_PLUGIN`. Every configuration is warmed up once first."""
    engines = {True: Engine(fixture, True, max(concurrency)), False: Engine(fixture, False, max(concurrency))}
    try:
        configs = [(NO_PLUGIN, False, None)] + [(name, True, spec) for name, spec in methods.items()]
        samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for n in concurrency:
            for _, plugin, spec in configs:
                engines[plugin].run(spec, n, new_tokens)  # warm-up
        for _ in range(repeats):
            for n in concurrency:
                for label, plugin, spec in configs:
                    samples.setdefault((n, label), []).append(engines[plugin].run(spec, n, new_tokens))
        return samples
    finally:
        for engine in engines.values():
            engine.close()


def ratio_stats(values: Sequence[float], over: Sequence[float], reduce: Callable = statistics.median) -> str:
    """``reduce`` of the per-repeat ratios ``values[i] / over[i]`` and their min–max."""
    ratios = [v / o for v, o in zip(values, over, strict=True)]
    return f"{reduce(ratios):.3f} [{min(ratios):.2f}–{max(ratios):.2f}]"


def rows(
    samples: dict[tuple[int, str], list[tuple[float, float]]], reduce: Callable = statistics.median
) -> list[dict]:
    """One summary per configuration: reduced TTFT / TPOT and per-repeat ratios against plain."""
    out = []
    for (n, label), runs in samples.items():
        plain = samples[n, "plain"]
        ttft, tpot = [r[0] for r in runs], [r[1] for r in runs]
        out.append(
            {
                "concurrency": n,
                "method": label,
                "ttft_s": reduce(ttft),
                "tpot_ms": 1000 * reduce(tpot),
                "ttft_ratios": [a / b[0] for a, b in zip(ttft, plain, strict=True)],
                "tpot_ratios": [a / b[1] for a, b in zip(tpot, plain, strict=True)],
            }
        )
    return out


def table(summary: list[dict], reduce: Callable = statistics.median) -> str:
    """Markdown: every configuration with its ratios against plain requests with the plugin."""
    lines = [
        "| concurrency | method | TTFT (ms) | TPOT (ms) | TTFT / plain [min–max] | TPOT / plain [min–max] |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(summary, key=lambda r: r["concurrency"]):
        ones = [1.0] * len(r["ttft_ratios"])
        ttft, tpot = (ratio_stats(r[key], ones, reduce) for key in ("ttft_ratios", "tpot_ratios"))
        lines.append(
            f"| {r['concurrency']} | {r['method']} | {1000 * r['ttft_s']:.1f} | {r['tpot_ms']:.2f} "
            f"| {ttft} | {tpot} |"
        )
    return "\n".join(lines)


def plugin_cost(summary: list[dict], reduce: Callable = statistics.median) -> str:
    """Markdown: plain requests with the plugin against the same requests without it."""
    by = {(r["concurrency"], r["method"]): r for r in summary}
    lines = ["| concurrency | TTFT with / without plugin | TPOT with / without plugin |", "|---:|---:|---:|"]
    for n in sorted({r["concurrency"] for r in summary}):
        without = by[n, NO_PLUGIN]
        ttft = ratio_stats([1.0] * len(without["ttft_ratios"]), without["ttft_ratios"], reduce)
        tpot = ratio_stats([1.0] * len(without["tpot_ratios"]), without["tpot_ratios"], reduce)
        lines.append(f"| {n} | {ttft} | {tpot} |")
    return "\n".join(lines)


def sum_of_parts(summary: list[dict], reduce: Callable = statistics.median) -> str:
    """Markdown: each composition's TPOT overhead against the sum of its parts' (same repeats)."""
    by = {(r["concurrency"], r["method"]): r for r in summary}
    lines = [
        "| concurrency | composition | TPOT / plain | parts' sum: 1 + sum(part TPOT / plain - 1) |",
        "|---:|---|---:|---:|",
    ]
    for r in summary:
        parts = r["method"].split("+")
        if len(parts) < 2 or any((r["concurrency"], p) not in by for p in parts):
            continue
        members = [by[r["concurrency"], p]["tpot_ratios"] for p in parts]
        parts_sum = [1 + sum(m[i] - 1 for m in members) for i in range(len(r["tpot_ratios"]))]
        own, theirs = reduce(r["tpot_ratios"]), reduce(parts_sum)
        lines.append(f"| {r['concurrency']} | {r['method']} | {own:.3f} | {theirs:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="llava", choices=("llava", "qwen2_vl"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", type=method_name, default=list(METHODS)[1:],
        help="besides plain; entries joined by '+' compose",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write all measurements to this file")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument(
        "--fastest", action="store_true", help="reduce the repeats by their minimum, not the median"
    )
    args = parser.parse_args()
    reduce = min if args.fastest else statistics.median
    methods = {"plain": None, **{name: spec_of(name) for name in args.methods}}
    summary = rows(measure(args.fixture, methods, args.concurrency, args.new_tokens, args.repeats), reduce)
    report = "\n".join(
        [
            f"engine overhead: {args.fixture}, {args.new_tokens} new tokens, {reduce.__name__} of "
            f"{args.repeats} interleaved repeats [min–max of the per-repeat ratios], per-request "
            f"streamed timestamps, {platform.machine()} with {os.cpu_count()} cores "
            "(CPU numbers are indicative)",
            "",
            table(summary, reduce),
            "",
            plugin_cost(summary, reduce),
            "",
            sum_of_parts(summary, reduce),
        ]
    )
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": summary}, fh, indent=2)


if __name__ == "__main__":
    main()
