"""Percentiles, per-configuration summaries and overhead ratios against the ``none`` baseline."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from vllm_halluguard.loadtest.client import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
#: A latency baseline below this (ms) is no measurement to divide by: a CPU engine can deliver a short
#: stream's tokens in one burst, so plain requests' TPOT and ITL come out near 0 and a ratio against them
#: reads as a huge overhead. Such ratios are left out (``None``) and the report says why.
MIN_BASELINE_MS = 0.1

# Two-sided 95 % Student t quantiles by degrees of freedom (1..30); normal beyond.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
    2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
    2.045, 2.042,
)  # fmt: skip


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation between closest ranks.

    Rank ``r = p/100 * (n - 1)`` on the sorted values, interpolated between ``floor(r)`` and
    ``ceil(r)`` (the "linear" definition, NumPy's default).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    xs = sorted(values)
    r = p / 100 * (len(xs) - 1)
    lo, hi = math.floor(r), math.ceil(r)
    return xs[lo] + (xs[hi] - xs[lo]) * (r - lo)


class Dist(BaseModel):
    """Summary of one latency metric, in milliseconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def dist(values_s: Sequence[float]) -> Dist | None:
    """Summary of values given in seconds (reported in ms); ``None`` when there are none."""
    if not values_s:
        return None
    ms = [v * 1e3 for v in values_s]
    return Dist(
        n=len(ms), mean=statistics.fmean(ms), min=min(ms), max=max(ms),
        **{f"p{p}": percentile(ms, p) for p in PERCENTILES},
    )  # fmt: skip


class MeanCI(BaseModel):
    """Mean over repeats with a two-sided 95 % t confidence half-width (0 for one repeat)."""

    mean: float
    ci95: float
    values: list[float]


def mean_ci(values: Sequence[float]) -> MeanCI:
    vals = list(values)
    m = statistics.fmean(vals) if vals else 0.0
    if len(vals) < 2:
        return MeanCI(mean=m, ci95=0.0, values=vals)
    df = len(vals) - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    return MeanCI(mean=m, ci95=t * statistics.stdev(vals) / math.sqrt(len(vals)), values=vals)


class Slo(BaseModel):
    """Goodput thresholds in ms; ``None`` means no limit on that metric."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


def meets(rec: RequestRecord, slo: Slo) -> bool:
    if not rec.ok:
        return False
    checks = ((slo.ttft, rec.ttft), (slo.tpot, rec.tpot), (slo.e2e, rec.e2e))
    return all(limit is None or (v is not None and v * 1e3 <= limit) for limit, v in checks)


class Summary(BaseModel):
    """Everything measured for one group of requests (a configuration, or one method inside a mix)."""

    requests: int
    ok: int
    errors: dict[str, int]
    output_len_mismatch: int  # successes whose output length differs from max_tokens
    ttft: Dist | None
    tpot: Dist | None
    itl: Dist | None
    e2e: Dist | None
    output_tokens: int
    chunks: int  # output-carrying stream chunks of the successes (ITL has chunks - ok gaps)
    merged_chunks: int  # chunks carrying more than one token (vLLM merges deltas the client lags on)
    # Throughputs: per repeat (tokens or requests of this group / the repeat's wall time), then mean ± CI.
    output_throughput: MeanCI  # tok/s
    request_throughput: MeanCI  # req/s
    goodput: MeanCI | None = None  # req/s meeting every SLO, when SLOs are given


def summarize(
    repeats: Sequence[tuple[Sequence[RequestRecord], float]], expected_tokens: int, slo: Slo | None = None
) -> Summary:
    """Summarise ``[(records of one repeat, that repeat's wall time in s), ...]``.

    Latency percentiles pool the successful requests of every repeat; throughputs are computed per
    repeat and then averaged.
    """
    records = [r for recs, _ in repeats for r in recs]
    good = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)

    def per_repeat(f: Callable[[Sequence[RequestRecord]], float]) -> MeanCI:
        return mean_ci([f(recs) / wall if wall > 0 else 0.0 for recs, wall in repeats])

    return Summary(
        requests=len(records),
        ok=len(good),
        errors=dict(sorted(errors.items())),
        output_len_mismatch=sum(1 for r in good if r.output_tokens != expected_tokens),
        ttft=dist([r.ttft for r in good if r.ttft is not None]),
        tpot=dist([t for r in good if (t := r.tpot) is not None]),
        itl=dist([g for r in good for g in r.itl]),
        e2e=dist([r.e2e for r in good if r.e2e is not None]),
        output_tokens=sum(r.output_tokens or 0 for r in good),
        chunks=sum(r.chunks for r in good),
        merged_chunks=sum(1 for r in good for n in r.chunk_tokens if n > 1),
        output_throughput=per_repeat(lambda recs: sum(r.output_tokens or 0 for r in recs if r.ok)),
        request_throughput=per_repeat(lambda recs: sum(1 for r in recs if r.ok)),
        goodput=per_repeat(lambda recs: sum(1 for r in recs if meets(r, slo))) if slo else None,
    )


def ratio(value: float | None, baseline: float | None, floor: float = 0.0) -> float | None:
    """``value / baseline``; ``None`` when either is missing or the baseline is not above ``floor``."""
    if value is None or baseline is None or baseline <= max(floor, 0.0) or not math.isfinite(baseline):
        return None
    return value / baseline


def ratios(group: Summary, baseline: Summary, throughput: bool = True) -> dict[str, float | None]:
    """Ratios of ``group`` to the ``none`` baseline measured at the same load point.

    Latency keys ``<metric>_<stat>`` (e.g. ``ttft_p50``): group / baseline, > 1 means slower; ``None``
    where the baseline is below :data:`MIN_BASELINE_MS`.
    Throughput keys: group / baseline, < 1 means less throughput; ``None`` unless ``throughput``
    (one method inside a mix carries only its share of the traffic, so its throughput is not comparable).
    """
    out: dict[str, float | None] = {}
    for metric in LATENCY_METRICS:
        g, b = getattr(group, metric), getattr(baseline, metric)
        for stat in ("mean", "p50", "p90", "p99"):
            value, base = (getattr(g, stat) if g else None), (getattr(b, stat) if b else None)
            out[f"{metric}_{stat}"] = ratio(value, base, floor=MIN_BASELINE_MS)
    for key in ("output_throughput", "request_throughput"):
        g, b = getattr(group, key).mean, getattr(baseline, key).mean
        out[key] = ratio(g, b) if throughput else None
    return out
