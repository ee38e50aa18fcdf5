"""Host time of PruneHal's torch path (the CPU engine's) per decode step, without an engine.

``R`` PruneHal decode rows at the tiny LLaVA's shapes (4 layers, 4 query and 2 KV heads of 32, a
prompt of 100 tokens with 64 image tokens) run through ``PruneHalEngine.run`` in every layer of each
step over a paged cache, then the host reads the step's decisions (``plan_step``, and the end-of-step
read where the code has one). The forced prune at step 2 masks every layer afterwards, so the timed
steps (3 onwards) are the masked path the engine serves. Prints the median and minimum of the step
times in µs. Only public engine entry points are used, so the same script times an older checkout::

    PYTHONPATH=. python benchmarks/prunehal_host.py --rows 1 16
    PYTHONPATH=/path/to/old/checkout python benchmarks/prunehal_host.py --rows 1 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch

LAYERS, HQ, HKV, D, BS = (0, 1, 2, 3), 4, 2, 32, 16
PROMPT, VISUAL = 100, torch.arange(5, 69)


def _setup(rows: int, steps: int) -> tuple[Any, list[Any], Any]:
    from vllm_halluguard.engine.cache_io import SplitViews
    from vllm_halluguard.engine.prunehal import PruneState
    from vllm_halluguard.engine.state import RequestState, Row
    from vllm_halluguard.methods.prunehal import PruneHalConfig

    g = torch.Generator().manual_seed(0)
    n_blocks = -(-(PROMPT + steps) // BS)
    k = torch.randn(rows * n_blocks + 1, BS, HKV, D, generator=g)
    v = torch.randn(rows * n_blocks + 1, BS, HKV, D, generator=g)
    table = (torch.arange(rows * n_blocks).view(rows, n_blocks) + 1).to(torch.int32)
    cfg = PruneHalConfig(r=0.4, t=3, layers=LAYERS)
    out = []
    for r in range(rows):
        state = RequestState(f"req{r}", r, cfg, PROMPT)
        record: dict[str, Any] = {"prompt_len": PROMPT, "steps": 0, "prunes": [], "reclaimable_blocks": 0}
        state.scratch["prunehal"] = PruneState.fresh(VISUAL.clone(), LAYERS, record)
        out.append(Row(r, state))
    runtime = SimpleNamespace(block_size=BS, num_layers=len(LAYERS), stats={}, ext={}, requests={})
    return SplitViews(k, v, table), out, runtime


def run(rows: int, steps: int) -> list[float]:
    """Per-step host times (s) of steps 3.. of ``rows`` requests."""
    from vllm_halluguard.engine import prunehal, reclaim
    from vllm_halluguard.engine.layer import LayerCall
    from vllm_halluguard.engine.prunehal import PruneHalEngine

    io, batch, runtime = _setup(rows, steps)
    engine = PruneHalEngine()
    g = torch.Generator().manual_seed(1)
    qsl = list(range(rows + 1))
    times = []
    with torch.no_grad():
        for step in range(steps):
            seq_lens = [PROMPT + step] * rows
            queries = torch.randn(len(LAYERS), rows, HQ, D, generator=g)
            start = time.perf_counter()
            for layer in LAYERS:
                call = LayerCall(
                    layer=layer, scale=D**-0.5, query=queries[layer], output=torch.zeros(rows, HQ, D),
                    query_start_loc=qsl, seq_lens=seq_lens, slot_mapping=torch.tensor(seq_lens),
                    runtime=runtime, gather=io.gather, write=io.write, gather_batch=io.gather_batch,
                    gather_slots=io.gather_slots,
                )  # fmt: skip
                engine.run(call, batch)
            read = runtime.ext.get(reclaim.READ_DECISIONS)
            if read is not None:
                read(runtime)
            engine.plan_step(runtime, batch, None, None, {})
            if step >= 2:
                times.append(time.perf_counter() - start)
    prunes = [len(row.request.scratch["prunehal"].record["prunes"]) for row in batch]
    assert all(prunes), f"every request must have pruned ({prunehal.__file__})"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vllm_halluguard.engine import tp

    tp.tp_group = lambda: tp._SINGLE  # one rank, no vLLM process group
    for rows in args.rows:
        t = run(rows, args.steps)
        print(f"rows {rows}: step median {1e6 * statistics.median(t):.0f} µs, min {1e6 * min(t):.0f} µs")


if __name__ == "__main__":
    main()
