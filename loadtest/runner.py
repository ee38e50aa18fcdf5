"""The run: warm-up, then every load point x repeat x scenario, under request and time limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from vllm_halluguard.loadtest import workload
from vllm_halluguard.loadtest.client import RequestRecord, send
from vllm_halluguard.loadtest.stats import Slo, Summary, ratios, summarize

logger = logging.getLogger(__name__)

Repeat = tuple[list[RequestRecord], float]  # the records of one repeat, its wall time (s)
ALL = "all"  # group name of a whole scenario (every request of it, whatever its method)


class Scenario(BaseModel):
    """One traffic configuration: a single method (``{"kvsmooth": 1.0}``) or a mix of methods."""

    name: str
    mix: dict[str, float]


class LoadPoint(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")

    kind: Literal["concurrency", "rate"]
    value: float  # concurrent requests, or requests per second (inf: all at once)
    max_concurrency: int | None = None  # rate mode only

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency={int(self.value)}"
        rate = "inf" if math.isinf(self.value) else f"{self.value:g}/s"
        cap = f" (max {self.max_concurrency})" if self.max_concurrency else ""
        return f"rate={rate}{cap}"


class LoadConfig(BaseModel):
    """Everything that defines a run (stored in the report)."""

    base_url: str
    model: str
    scenarios: list[Scenario]
    loads: list[LoadPoint]
    requests_per_point: int = Field(ge=1)
    warmup: int = Field(ge=0)  # per method, at concurrency 1, excluded from the results
    repeats: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    ignore_eos: bool = True
    image_sizes: list[tuple[int, int]]
    images: int = Field(ge=1)
    prompt: str
    seed: int
    request_timeout_s: float = Field(gt=0)
    max_requests: int = Field(ge=1)
    max_duration_s: float = Field(gt=0)
    omit_none_field: bool = False
    slo: Slo | None = None

    @property
    def methods(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.scenarios:
            seen |= dict.fromkeys(s.mix)
        return list(seen)

    def planned_requests(self) -> int:
        measured = len(self.loads) * self.repeats * len(self.scenarios) * self.requests_per_point
        return self.warmup * len(self.methods) + measured


class GroupResult(BaseModel):
    scenario: str
    mitigation: str  # the method of these requests, or "all" for a whole mixed scenario
    summary: Summary
    ratios_vs_none: dict[str, float | None]


class PointResult(BaseModel):
    load: LoadPoint
    label: str
    wall_s: dict[str, list[float]]  # scenario -> wall time of each repeat
    groups: list[GroupResult]


class Totals(BaseModel):
    warmup_sent: int = 0
    warmup_ok: int = 0
    sent: int = 0  # measured requests sent (warm-up excluded)
    ok: int = 0
    errors: dict[str, int] = {}
    truncated: bool = False  # the time limit stopped the run early
    duration_s: float = 0.0
    #: The server's ``/metrics`` counters of PruneHal's KV reclaim over the run (``None``: unreadable).
    freed_kv_blocks: float | None = None
    reclaiming_requests: float | None = None


class Report(BaseModel):
    config: LoadConfig
    setup: dict[str, Any]
    points: list[PointResult]
    totals: Totals


# ------------------------------------------------------------------------------------------ setup


async def describe_server(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """What the server says about itself (models, version, mitigations); missing routes are skipped."""
    info: dict[str, Any] = {}
    for key, path in (("models", "/v1/models"), ("version", "/version"), ("mitigations", "/v1/mitigations")):
        try:
            resp = await client.get(base_url.rstrip("/") + path, timeout=10)
            if resp.status_code == 200:
                info[key] = resp.json()
        except (httpx.HTTPError, ValueError):
            pass
    return info


#: ``/metrics`` counters read before and after a run (``Totals`` field -> metric name).
ENGINE_COUNTERS = {
    "freed_kv_blocks": "halluguard_prunehal_freed_blocks",
    "reclaiming_requests": "halluguard_prunehal_reclaiming_requests",
}


def parse_counters(text: str) -> dict[str, float]:
    """The :data:`ENGINE_COUNTERS` in a Prometheus text exposition (unlabelled samples)."""
    wanted = {metric: field for field, metric in ENGINE_COUNTERS.items()}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            with contextlib.suppress(ValueError):
                out[wanted[name]] = float(value)
    return out


async def engine_counters(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """:func:`parse_counters` of the server's ``/metrics``; empty when it cannot be read."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return parse_counters(resp.text) if resp.status_code == 200 else {}


def count_reclaim(totals: Totals, before: dict[str, float], after: dict[str, float]) -> None:
    """Record the counters' growth over the run in ``totals`` (fields stay ``None`` if unread)."""
    for field in ENGINE_COUNTERS:
        if field in before and field in after:
            setattr(totals, field, after[field] - before[field])


def client_setup() -> dict[str, Any]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "httpx": httpx.__version__,
        "git_sha": sha or None,
    }


# -------------------------------------------------------------------------------------------- run


class Runner:
    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, progress: Any = None) -> None:
        self.cfg = cfg
        self.client = client
        self.progress = progress
        self.url = cfg.base_url.rstrip("/") + "/v1/chat/completions"
        self.images = workload.image_pool(cfg.images, cfg.image_sizes, cfg.seed)
        self.deadline = 0.0
        self.totals = Totals()

    def _body(self, mitigation: str, image_index: int) -> dict[str, Any]:
        cfg = self.cfg
        field = None if (cfg.omit_none_field and mitigation == workload.BASELINE) else mitigation
        image = self.images[image_index % len(self.images)]
        return workload.chat_body(cfg.model, image, cfg.prompt, cfg.max_tokens, field, cfg.ignore_eos)

    async def _one(self, mitigation: str, image_index: int) -> RequestRecord | None:
        """One request under the global deadline; ``None`` when the deadline passed before sending."""
        left = self.deadline - time.perf_counter()
        if left <= 0:
            return None
        timeout = min(self.cfg.request_timeout_s, left)
        rec = await send(self.client, self.url, self._body(mitigation, image_index), mitigation, timeout)
        if rec.error == "timeout" and timeout < self.cfg.request_timeout_s:
            rec.error, rec.detail = "aborted_at_time_limit", "the run's --max-duration ended it"
        if self.progress is not None:
            self.progress.update(1)
        return rec

    async def batch(
        self, methods: list[str], point: LoadPoint, first_image: int, arrival_seed: int
    ) -> tuple[list[RequestRecord], float]:
        """Send one request per entry of ``methods`` at ``point``'s load: (records sent, wall time)."""
        n = len(methods)
        limit: int | None
        if point.kind == "concurrency":
            limit, offsets = int(point.value), [0.0] * n
        else:
            limit, offsets = point.max_concurrency, workload.arrival_offsets(n, point.value, arrival_seed)
        sem = asyncio.Semaphore(limit or n)
        t0 = time.perf_counter()

        async def task(i: int) -> RequestRecord | None:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(min(delay, max(0.0, self.deadline - time.perf_counter())))
            async with sem:
                return await self._one(methods[i], first_image + i)

        results = await asyncio.gather(*(task(i) for i in range(n)))
        wall = time.perf_counter() - t0
        return [r for r in results if r is not None], wall

    async def run(self) -> tuple[list[PointResult], Totals]:
        cfg = self.cfg
        started = time.perf_counter()
        self.deadline = started + cfg.max_duration_s
        for method in cfg.methods:  # warm-up: per method, sequential, not measured
            for i in range(cfg.warmup):
                rec = await self._one(method, i)
                if rec is not None:
                    self.totals.warmup_sent += 1
                    self.totals.warmup_ok += rec.ok
                    if not rec.ok:
                        logger.warning("warm-up request (%s) failed: %s %s", method, rec.error, rec.detail)
        points: list[PointResult] = []
        for li, point in enumerate(cfg.loads):
            runs: dict[str, list[Repeat]] = {s.name: [] for s in cfg.scenarios}
            for rep in range(cfg.repeats):
                # Rotate the scenario order per repeat so that slow drift does not favour one of them.
                k = rep % len(cfg.scenarios)
                for scenario in cfg.scenarios[k:] + cfg.scenarios[:k]:
                    if time.perf_counter() >= self.deadline:
                        self.totals.truncated = True
                        break
                    seed = cfg.seed + 1009 * li + 31 * rep
                    methods = workload.assign(scenario.mix, cfg.requests_per_point, seed)
                    first_image = rep * cfg.requests_per_point  # the same images for every scenario
                    records, wall = await self.batch(methods, point, first_image, seed)
                    runs[scenario.name].append((records, wall))
                    self._count(records)
                    if len(records) < len(methods):
                        self.totals.truncated = True
            points.append(self._point(point, runs))
        self.totals.duration_s = time.perf_counter() - started
        return points, self.totals

    def _count(self, records: list[RequestRecord]) -> None:
        t = self.totals
        t.sent += len(records)
        for r in records:
            if r.ok:
                t.ok += 1
            else:
                t.errors[r.error or "unknown"] = t.errors.get(r.error or "unknown", 0) + 1

    def _point(self, point: LoadPoint, runs: dict[str, list[Repeat]]) -> PointResult:
        cfg = self.cfg
        groups: list[tuple[str, str, Summary, bool]] = []  # scenario, method, summary, whole scenario?
        for scenario in cfg.scenarios:
            reps = runs[scenario.name]
            if not reps:
                continue
            whole = ALL if len(scenario.mix) > 1 else next(iter(scenario.mix))
            groups.append((scenario.name, whole, summarize(reps, cfg.max_tokens, cfg.slo), True))
            if len(scenario.mix) > 1:
                for method in scenario.mix:
                    part = [([r for r in recs if r.mitigation == method], wall) for recs, wall in reps]
                    groups.append((scenario.name, method, summarize(part, cfg.max_tokens, cfg.slo), False))
        base = next((s for name, _, s, _ in groups if name == workload.BASELINE), None)
        return PointResult(
            load=point,
            label=point.label,
            wall_s={name: [w for _, w in reps] for name, reps in runs.items() if reps},
            groups=[
                GroupResult(
                    scenario=name, mitigation=method, summary=s,
                    ratios_vs_none=ratios(s, base, throughput=whole) if base is not None else {},
                )
                for name, method, s, whole in groups
            ],
        )  # fmt: skip
