"""Reading the CPU paged cache for KVSmooth's decode rows: full K and V against K plus two slots.

    python benchmarks/gather_bench.py            # tiny-model and 7B-like shapes, 16 rows each

KVSmooth needs every key of a row (its attention entropy) but K and V of only two slots (the EMA);
PruneHal needs V only once something is pruned. Prints milliseconds per layer call for both reads.
"""

from __future__ import annotations

import time

import torch

from vllm_halluguard.engine.cpu_cache import gather_kv_batched, gather_slots, learn_layout

SHAPES = [(16, 100, 2, 32), (16, 2048, 8, 128)]  # rows, tokens, KV heads, head size
BLOCK = 16


def _time(fn, iters: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def measure(rows: int, tokens: int, hkv: int, hs: int) -> tuple[float, float]:
    """(full K and V gather, K gather plus two slots) in ms, for ``rows`` rows of ``tokens`` tokens."""
    per_row = -(-tokens // BLOCK)
    cache = torch.randn(rows * per_row + 1, hkv, BLOCK, 2 * hs)
    table = torch.randperm(rows * per_row).view(rows, per_row).int()
    layout = learn_layout("vec", torch.float32, BLOCK, hs)
    ids, lens = list(range(rows)), [tokens] * rows
    pos = torch.tensor(lens) - 1
    b = torch.arange(rows)

    def full():
        k, v, _ = gather_kv_batched(cache, table, ids, lens, layout)
        return k[b, pos], v[b, pos], k[b, pos - 1], v[b, pos - 1]

    def k_and_slots():
        gather_kv_batched(cache, table, ids, lens, layout, values=False)
        return gather_slots(cache, table, ids, torch.stack([pos - 1, pos], 1), layout)

    return _time(full), _time(k_and_slots)


def main() -> None:
    torch.manual_seed(0)
    print("| rows | tokens | KV heads x head size | K and V (ms) | K + 2 slots (ms) |")
    print("|---:|---:|---|---:|---:|")
    for shape in SHAPES:
        full, k_only = measure(*shape)
        rows, tokens, hkv, hs = shape
        print(f"| {rows} | {tokens} | {hkv} x {hs} | {full:.2f} | {k_only:.2f} |")


if __name__ == "__main__":
    main()
