"""Writing a run down: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from vllm_halluguard import __version__
from vllm_halluguard.loadtest.runner import ALL, GroupResult, PointResult, Report, Totals
from vllm_halluguard.loadtest.stats import LATENCY_METRICS, MIN_BASELINE_MS, Dist, MeanCI
from vllm_halluguard.loadtest.workload import BASELINE

logger = logging.getLogger(__name__)

PLOTS = ("latency.png", "overhead.png")


def write_all(report: Report, out: Path) -> list[Path]:
    """Write the JSON, the Markdown and (when matplotlib is installed) the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(report.model_dump_json(indent=2) + "\n")
    paths[1].write_text(markdown(report))
    try:
        paths += plot(report, out)
    except ImportError:
        logger.warning("matplotlib is not installed: no plots written")
    return paths


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _d(d: Dist | None) -> str:
    return "–" if d is None else f"{d.p50:.1f} / {d.p90:.1f} / {d.p99:.1f} ({d.mean:.1f})"


def _ci(m: MeanCI, digits: int = 1) -> str:
    """``mean ± 95 % CI`` over repeats; the mean alone for a single repeat."""
    return _f(m.mean, digits) + (f" ± {_f(m.ci95, digits)}" if len(m.values) > 1 else "")


def _name(g: GroupResult) -> str:
    if g.mitigation in (ALL, g.scenario):
        return g.scenario
    return f"{g.scenario} → {g.mitigation}"


def _errors(g: GroupResult) -> str:
    e = g.summary.errors
    return ", ".join(f"{k}: {v}" for k, v in e.items()) if e else "0"


def _max_len(setup: dict) -> str:
    try:
        return str(setup["models"]["data"][0]["max_model_len"])
    except (KeyError, IndexError, TypeError):
        return "unknown"


def _listed(setup: dict) -> str:
    """Methods the server's ``GET /v1/mitigations`` says it runs and allows (halluguard servers only)."""
    try:
        rows = setup["mitigations"]["data"]
        names = [r["method"] for r in rows if r.get("engine_supported", True) and r.get("allowed", True)]
    except (KeyError, TypeError):
        return "unknown (no /v1/mitigations)"
    return ", ".join(names) or "none"


def _reclaim(t: Totals) -> str:
    """The KV blocks PruneHal gave back during the run (warm-up included), from the server's /metrics."""
    if t.freed_kv_blocks is None:
        return "KV blocks given back by PruneHal: unknown (the server's /metrics was not readable)"
    n, reqs = t.freed_kv_blocks, t.reclaiming_requests or 0
    per = f", {n / reqs:.1f} per request" if reqs else ""
    return f"KV blocks given back by PruneHal: {n:.0f} by {reqs:.0f} requests{per} (warm-up included)"


def _plugin_version(setup: dict[str, Any]) -> str:
    """The plugin version the server lists on ``/v1/mitigations`` ("unknown" from an older server)."""
    version = setup.get("mitigations", {}).get("version")
    return str(version.get("vllm_halluguard", "unknown")) if isinstance(version, dict) else "unknown"


def _degenerate_baseline(point: PointResult) -> str:
    """The latency metrics (e.g. ``TPOT, ITL``) whose ``none`` p50 at ``point`` is too small to divide by."""
    whole = (g.summary for g in point.groups if g.scenario == BASELINE and g.mitigation in (ALL, BASELINE))
    base = next(whole, None)
    if base is None:
        return ""
    low = [m for m in LATENCY_METRICS if (d := getattr(base, m)) is not None and d.p50 < MIN_BASELINE_MS]
    return ", ".join(m.upper() for m in low)


def markdown(report: Report) -> str:
    cfg, setup, t = report.config, report.setup, report.totals
    sizes = ", ".join(f"{w}x{h}" for w, h in cfg.image_sizes)
    lines = [
        "# Load test",
        "",
        f"- target: `{cfg.base_url}`, model `{cfg.model}`; started {setup.get('started_at')}, "
        f"git `{setup.get('git_sha') or 'unknown'}`",
        f"- server: vLLM {setup.get('version', {}).get('version', 'unknown')}, vllm-halluguard "
        f"{_plugin_version(setup)}; load test vllm-halluguard {__version__}; max_model_len "
        f"{_max_len(setup)}; mitigations listed: {_listed(setup)}",
        f"- workload: 1 image per request ({cfg.images} seeded images, {sizes}), prompt "
        f"{cfg.prompt!r}, {cfg.max_tokens} output tokens (ignore_eos={cfg.ignore_eos}), seed {cfg.seed}",
        f"- load points: {', '.join(p.label for p in cfg.loads)}; {cfg.requests_per_point} requests per "
        f"point and scenario, {cfg.repeats} repeat(s), {cfg.warmup} warm-up request(s) per method excluded",
        f"- requests: {t.sent} measured ({t.ok} ok), {t.warmup_sent} warm-up; "
        f"errors {t.errors or 0}; {t.duration_s:.1f} s"
        + ("; **stopped at the time limit**" if t.truncated else ""),
        f"- {_reclaim(t)}",
        "",
        "Latencies in ms as p50 / p90 / p99 (mean). ITL pools every gap between streamed output chunks; "
        "TPOT = (E2E − TTFT) / (output tokens − 1). Throughputs are means over repeats (± 95 % CI); "
        "for a method inside a mix they count only that method's share of the traffic.",
        "",
    ]
    for point in report.points:
        lines += [
            f"## {point.label}",
            "",
            "| scenario | ok/sent | errors | TTFT | TPOT | ITL | E2E | out tok/s | req/s |"
            + (" goodput req/s |" if cfg.slo else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if cfg.slo else ""),
        ]
        for g in point.groups:
            s = g.summary
            row = (
                f"| {_name(g)} | {s.ok}/{s.requests} | {_errors(g)} | {_d(s.ttft)} | {_d(s.tpot)} | "
                f"{_d(s.itl)} | {_d(s.e2e)} | {_ci(s.output_throughput)} | {_ci(s.request_throughput, 2)} |"
            )
            if cfg.slo:
                row += f" {_f(s.goodput.mean, 2) if s.goodput else '–'} |"
            lines.append(row)
        whole = [g.summary for g in point.groups if g.mitigation in (ALL, g.scenario)]
        lines += [
            "",
            f"Stream chunks: {sum(s.merged_chunks for s in whole)} of {sum(s.chunks for s in whole)} carried "
            "more than one token (vLLM merges the deltas of a lagging client; ITL counts chunk gaps).",
            "",
            "Overhead vs `none` at this load point (ratio; latency > 1 is slower, throughput < 1 is less):",
            "",
            "| scenario | TTFT p50 | TPOT p50 | ITL p50 | E2E p50 | E2E p99 | out tok/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in point.groups:
            r = g.ratios_vs_none
            keys = ("ttft_p50", "tpot_p50", "itl_p50", "e2e_p50", "e2e_p99", "output_throughput")
            lines.append(f"| {_name(g)} | " + " | ".join(_f(r.get(k), 3) for k in keys) + " |")
        degenerate = _degenerate_baseline(point)
        if degenerate:
            lines += [
                "",
                f"No ratio for {degenerate}: `none`'s p50 is below {MIN_BASELINE_MS} ms at this load point "
                "(its tokens arrived together), so a ratio against it would measure nothing.",
            ]
        lines.append("")
    return "\n".join(lines)


def plot(report: Report, out: Path) -> list[Path]:
    """``latency.png`` (p50 of each metric vs load point) and ``overhead.png`` (E2E p50 ratio vs none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p.label for p in report.points]
    series: dict[str, list[GroupResult | None]] = {}
    for i, point in enumerate(report.points):
        for g in point.groups:
            series.setdefault(_name(g), [None] * len(labels))[i] = g
    x = list(range(len(labels)))

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("ttft", "TTFT p50 (ms)"), ("tpot", "TPOT p50 (ms)"), ("itl", "ITL p50 (ms)")]
    panels += [("e2e", "E2E p50 (ms)"), ("output_throughput", "output tok/s"), ("e2e99", "E2E p99 (ms)")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for name, gs in series.items():
            ys = [_value(g, key) for g in gs]
            ax.plot(x, [math.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_title(title)
        ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    latency = out / PLOTS[0]
    fig.savefig(latency, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(series))
    for k, (name, gs) in enumerate(series.items()):
        ys = [g.ratios_vs_none.get("e2e_p50") if g else None for g in gs]
        ax.bar([i + k * width for i in x], [math.nan if y is None else y for y in ys], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in x], labels, rotation=20, fontsize=8)
    ax.set_ylabel("E2E p50 / E2E p50 of none")
    ax.set_title("Overhead vs none (same run, same load point)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    overhead = out / PLOTS[1]
    fig.savefig(overhead, dpi=100)
    plt.close(fig)
    return [latency, overhead]


def _value(g: GroupResult | None, key: str) -> float | None:
    if g is None:
        return None
    s = g.summary
    if key == "output_throughput":  # a method inside a mix carries only its share: not plotted
        return s.output_throughput.mean if g.mitigation in (ALL, g.scenario) else None
    if key == "e2e99":
        return s.e2e.p99 if s.e2e else None
    d = getattr(s, key)
    return d.p50 if d else None
