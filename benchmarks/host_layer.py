"""Host time of a mitigated decode step on the CPU engine: per layer call and per step's plan.

A tiny model on CPU computes in microseconds, so the wall time of the plugin's code in a step is its
host work (Python, tensor bookkeeping, small ops): what a GPU step pays on the host on top of its
kernels, and cannot hide behind them where it synchronises. The script serves ``R`` requests of one
method together (``R`` = 1, 8, 32 by default), times every call of the attention layer's mitigated path
(:func:`vllm_halluguard.engine.execute.run_layer`) and of the step's partition
(:func:`vllm_halluguard.engine.plan.build_plan`) in the steps where all ``R`` rows decode, and prints
the medians in µs: over every layer call, and per decoder layer (the layers a method mitigates against
those it leaves to vLLM's kernel), with each layer's fastest call beside (the least disturbed on a
shared machine: the work is the same in every step). ``--count-ops`` also counts the torch ops
dispatched per layer call (a ``TorchDispatchMode`` around the call, in a separate pass so that the
timings do not include it).

Two paths: by default the CPU engine's own (the reworked rows' attention computed in torch, tiny
tensors); with ``--kernel-path`` the GPU code path (the builders switched to the kernel lane, as on a
GPU) with the Triton launches replaced by stubs (the attention kernel's wrapper by one that only
zero-fills its outputs; KVSmooth's update keeps its wrapper, whose launch does nothing), so what is
timed is the host orchestration around the kernels: the step's tables, the lane's arguments, the
methods' ``after_kernel`` (not Triton's own launch path). The stubs' outputs are not attention, so the
generated tokens are meaningless there.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/host_layer.py
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/host_layer.py --kernel-path --rows 1 32
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/host_layer.py --kernel-path --count-ops
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

METHODS: dict[str, Any] = {
    "kvsmooth": "kvsmooth",
    "farsight-B": {"method": "farsight", "mode": "B"},
    "prunehal": "prunehal",
    "kvsmooth+prunehal": ["kvsmooth", "prunehal"],
}


def _kernel_lane_on(worker: Any) -> None:
    """``collective_rpc`` helper: the plugin's metadata builders take the kernel lane, as on a GPU."""
    for groups in worker.model_runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if hasattr(builder, "_hg_kernel"):
                    builder._hg_kernel = True


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0f}" if xs else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="llava", choices=("llava", "qwen2_vl"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--kernel-path", action="store_true", help="the GPU path, kernel launch stubbed")
    parser.add_argument("--count-ops", action="store_true", help="also count torch ops per layer call")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row count (pooled)")
    args = parser.parse_args()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        parser.error("run with VLLM_ENABLE_V1_MULTIPROCESSING=0 (the timers live in this process)")

    from vllm_halluguard.engine import execute, plan
    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY
    from vllm_halluguard.parity import Case, engine, run_vllm

    times: dict[Any, list[float]] = defaultdict(list)
    state = {"n": 0, "count": False}

    def timed(name: str, fn: Any, rows_of: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            counter = OpCounter() if state["count"] and name == "layer" else None
            start = time.perf_counter()
            if counter is None:
                out = fn(*a, **kw)
            else:
                with counter:
                    out = fn(*a, **kw)
            elapsed = time.perf_counter() - start
            rows, tokens = rows_of(a)
            if rows == tokens == state["n"]:  # every row of the batch decodes one token
                if counter is not None:
                    times["ops", execute.layer_index(a[2].layer_name)].append(counter.ops)
                else:
                    times[name].append(elapsed)
                    if name == "layer":
                        times[name, execute.layer_index(a[2].layer_name)].append(elapsed)
            return out

        return wrapper

    execute.run_layer = timed(  # type: ignore[assignment]
        "layer", execute.run_layer, lambda a: (len(a[7].query_start_loc) - 1, a[7].num_actual_tokens)
    )
    plan.build_plan = timed(  # type: ignore[assignment]
        "plan", plan.build_plan, lambda a: (a[2].num_reqs, a[2].num_actual_tokens)
    )
    lines = [
        "| method | rows | layer call µs (median) | per layer µs (median) | per layer µs (min) "
        "| torch ops per layer call | layer calls | plan µs per step (median) |",
        "|---|---:|---:|---|---|---|---:|---:|",
    ]
    if args.kernel_path:
        from vllm_halluguard.kernels import kvsmooth_update, triton_attention

        def no_kernel(out: Any, lse: Any, entropy: Any, *a: Any, **kw: Any) -> None:
            out.zero_(), lse.zero_(), entropy.zero_()

        triton_attention.paged_attention_into = no_kernel  # type: ignore[assignment]

        class NoLaunch:  # KVSmooth's update: its wrapper runs, the launch does nothing
            def __getitem__(self, grid: Any) -> Any:
                return lambda *a, **kw: None

        kvsmooth_update._kvsmooth_update_kernel = NoLaunch()  # type: ignore[assignment]
        kvsmooth_update.available = lambda k_cache: True  # type: ignore[assignment]
    with engine(args.fixture, max_num_seqs=max(args.rows), enable_prefix_caching=False) as llm:
        if args.kernel_path:
            llm.collective_rpc(_kernel_lane_on)
        for name in args.methods:
            extra = {EXTRA_ARGS_KEY: METHODS[name]}
            for n in args.rows:
                cases = [
                    Case(args.fixture, i, max_tokens=args.new_tokens, extra_args=extra) for i in range(n)
                ]
                state["n"] = n
                run_vllm(llm, cases)  # warm-up
                times.clear()
                for _ in range(args.repeats):
                    run_vllm(llm, cases)
                if args.count_ops:
                    state["count"] = True
                    run_vllm(llm, cases)
                    state["count"] = False
                layer, steps = times["layer"], times["plan"]
                layers = sorted(key[1] for key in times if isinstance(key, tuple) and key[0] == "layer")
                per_layer = " / ".join(_median([1e6 * x for x in times["layer", i]]) for i in layers)
                fastest = " / ".join(f"{1e6 * min(times['layer', i]):.0f}" for i in layers)
                ops = " / ".join(_median(times["ops", i]) for i in layers) if args.count_ops else "–"
                median = 1e6 * statistics.median(layer)
                lines.append(
                    f"| {name} | {n} | {median:.0f} | {per_layer} | {fastest} | {ops} "
                    f"| {len(layer)} | {1e6 * statistics.median(steps):.0f} |"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
