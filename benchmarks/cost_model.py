"""A GPU cost model of one decode step, built from measured H200 kernel times (no GPU needed).

Modelled decode-step time = weight bytes / memory bandwidth + layers x attention time per layer.

* Weights: the language model's parameters read once per step in bf16 (the input embedding is
  gathered, not read whole, so it is left out; the vision tower does not run while decoding).
* Bandwidth: 4.3 TB/s, the device-to-device copy rate measured on the H200
  (/work/shared/research/gpu-measurements.md).
* Attention per layer: the *measured* time of vLLM 0.32's ``unified_attention`` (the faster of its
  2D and 3D kernels) as the native kernel, from the same file and from issues 14/15. Those tables
  give our old kernel's time (``plain ms``) and every other kernel as a ratio to it.
* Extra kernel time a method adds per step (all rows of the batch mitigated, native-first engine:
  the mitigated rows run our kernel instead of the native one): layers x (our old kernel's time
  with what the method needs - native time). FarSight and KVSmooth: ``sinks+stats``; PruneHal:
  ``+mask``; SCR decodes plain rows (0). Not modelled in the kernel time: KVSmooth's two-slot cache
  update, PruneHal's decisions, SCR's prefill pass.
* Host time a method adds per step (``host ms``): layers x the measured host time of one mitigated
  layer call + the step's plan, at that many mitigated rows (:data:`HOST_US`, measured on the CPU
  engine with the kernel launch stubbed out: ``benchmarks/host_layer.py --kernel-path``, tiny LLaVA,
  this project's 2-core development machine). It is host time, not GPU time: it hides behind the GPU
  only where the step does not synchronise and exceeds it otherwise, and a serving node's faster CPU
  shortens it. It is printed beside the step, not added to it.

Only shapes that were measured are modelled; others print "not measured". These are kernel times
of the previous kernel (before split-KV), so the method columns are what that kernel would cost.

    python benchmarks/cost_model.py
"""

from __future__ import annotations

from dataclasses import dataclass

BANDWIDTH = 4.3e12  # B/s, measured device copy rate on the H200


@dataclass(frozen=True)
class Model:
    name: str
    lm_params: float  # language-model parameters read per step (input embedding excluded)
    layers: int
    heads: str  # the measured kernel shape: "32/32" or "28/4"


MODELS = (
    # LLaMA-2-7B body: 6.74e9 parameters, 0.131e9 of them the input embedding (32000 x 4096).
    Model("LLaVA-1.5-7B", 6.74e9 - 0.131e9, 32, "32/32"),
    # Qwen2-7B body of Qwen2-VL-7B: 7.62e9 parameters, 0.545e9 the input embedding (152064 x 3584).
    Model("Qwen2-VL-7B", 7.62e9 - 0.545e9, 28, "28/4"),
)

# Measured on an H200, bf16, D 128, block 16 (gpu-measurements.md; issues 14 and 15):
# (heads, batch, context) -> (our plain ms, sinks+stats ratio, +mask ratio, vLLM 2D ratio, vLLM 3D ratio)
MEASURED: dict[tuple[str, int, int], tuple[float, float, float, float, float]] = {
    ("32/32", 1, 600): (0.0699, 1.09, 1.29, 0.49, 0.72),
    ("32/32", 8, 600): (0.0467, 1.01, 1.12, 0.95, 1.12),
    ("32/32", 32, 600): (0.1100, 0.99, 1.02, 0.89, 1.55),
    ("32/32", 1, 2000): (0.1049, 1.00, 1.23, 0.95, 0.48),
    ("32/32", 8, 2000): (0.1219, 1.03, 1.15, 0.95, 0.98),
    ("32/32", 32, 2000): (0.3198, 0.99, 1.02, 0.89, 1.33),
    ("28/4", 1, 2000): (0.1039, 0.97, 1.25, 0.94, 0.44),
    ("28/4", 32, 2000): (0.1092, 1.09, 1.34, 1.03, 0.69),
}
BATCHES = (1, 8, 32)
# Host µs with every row of the batch mitigated: (one layer call, the step's plan), per method: the
# median layer call over the tiny LLaVA's 4 layers and the step's plan, measured 2026-12-07 16:20 UTC
# (benchmarks/host_layer.py --kernel-path --count-ops, docs/benchmarks.md) on the idle machine, after
# KVSmooth's fused update launch and PruneHal's per-step tables (launches stubbed).
HOST_US: dict[str, dict[int, tuple[float, float]]] = {
    "kvsmooth": {1: (58, 447), 8: (65, 574), 32: (127, 871)},
    "prunehal": {1: (304, 455), 8: (418, 655), 32: (634, 1064)},
}
CONTEXTS = (600, 2000)


def rows() -> list[dict[str, object]]:
    out = []
    for model in MODELS:
        weights_ms = model.lm_params * 2 / BANDWIDTH * 1e3
        for ctx in CONTEXTS:
            for batch in BATCHES:
                row: dict[str, object] = {
                    "model": model.name,
                    "batch": batch,
                    "ctx": ctx,
                    "weights": weights_ms,
                }
                m = MEASURED.get((model.heads, batch, ctx))
                if m is not None:
                    plain, stats, mask, v2d, v3d = m
                    native = plain * min(v2d, v3d)
                    step = weights_ms + model.layers * native
                    row |= {
                        "attn": model.layers * native,
                        "step": step,
                        "farsight": model.layers * (plain * stats - native),
                        "kvsmooth": model.layers * (plain * stats - native),
                        "prunehal": model.layers * (plain * mask - native),
                        "scr": 0.0,
                    }
                for method, per_batch in HOST_US.items():
                    layer_us, plan_us = per_batch[batch]
                    row[f"host_{method}"] = (model.layers * layer_us + plan_us) / 1e3
                out.append(row)
    return out


def markdown(table: list[dict[str, object]]) -> str:
    head = "| model | batch | ctx | weights ms | attention ms | step ms | FarSight-C / KVSmooth +ms"
    head += " | PruneHal +ms | SCR +ms | host ms: KVSmooth / PruneHal |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        cells = [r["model"], r["batch"], r["ctx"], f"{r['weights']:.2f}"]
        if "step" in r:
            step = float(r["step"])  # type: ignore[arg-type]
            extra = [float(r[k]) for k in ("kvsmooth", "prunehal", "scr")]  # type: ignore[arg-type]
            cells += [f"{r['attn']:.2f}", f"{step:.2f}", *(f"{v:+.2f} ({v / step:+.0%})" for v in extra)]
        else:
            cells += ["not measured", f"≥ {r['weights']:.2f}", "–", "–", "–"]
        cells.append(f"{r['host_kvsmooth']:.1f} / {r['host_prunehal']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows()))
