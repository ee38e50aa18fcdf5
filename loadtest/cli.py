"""``halluguard-loadtest``: sweep load on an OpenAI-compatible chat endpoint, per mitigation, vs ``none``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from vllm_halluguard.loadtest import report, workload
from vllm_halluguard.loadtest.client import RemoteTargetError, check_target
from vllm_halluguard.loadtest.runner import (
    LoadConfig,
    LoadPoint,
    Report,
    Runner,
    Scenario,
    client_setup,
    count_reclaim,
    describe_server,
    engine_counters,
)
from vllm_halluguard.loadtest.stats import Slo

logger = logging.getLogger("loadtest")


class DefaultOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows an option's default once: not where its text already gives one, nor when unset."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


#: Ceilings on the limit flags themselves, so that a typo cannot start an endless run.
MAX_REQUESTS_CEILING = 100_000
MAX_DURATION_CEILING_S = 24 * 3600


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return vals


def _rates(text: str) -> list[float]:
    try:
        vals = [float(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf): {text!r}")
    return vals


def _slo(text: str) -> Slo:
    fields: dict[str, float] = {}
    for item in _csv(text):
        key, _, value = item.partition("=")
        if key not in Slo.model_fields:
            raise argparse.ArgumentTypeError(f"unknown SLO {key!r}: use ttft, tpot, e2e (ms)")
        try:
            fields[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad SLO value in {item!r}") from None
    return Slo(**fields)


T = TypeVar("T")


def _arg(kind: Callable[[str], T]) -> Callable[[str], T]:
    """``kind`` as an argparse type: its ``ValueError`` becomes argparse's usage error."""

    def parse(text: str) -> T:
        try:
            return kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="halluguard-loadtest",
        description="Load-test an OpenAI-compatible /v1/chat/completions endpoint (streaming, one image "
        "per request) per mitigation; 'none' is always measured as the baseline of the overhead ratios.",
        formatter_class=DefaultOnceFormatter,
    )
    a = p.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is accepted)")
    a("--model", default=None, help="model name (default: the first one /v1/models lists)")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (env OPENAI_API_KEY)")
    a("--mitigation", action="append", default=[], metavar="NAMES",
      help="methods to measure alone (repeatable or comma-separated); 'none' is always added")  # fmt: skip
    a("--mix", action="append", default=[], type=_arg(workload.parse_mix), metavar="M=W,...",
      help="a mixed-traffic scenario, e.g. kvsmooth=0.5,none=0.5 (repeatable)")  # fmt: skip
    a("--concurrency", type=_positive_ints, default=None, metavar="N,...",
      help="closed-loop concurrency sweep (default 1,4 when no --rate is given)")  # fmt: skip
    a("--rate", type=_rates, default=None, metavar="R,...", help="Poisson rate sweep, req/s (inf ok)")
    a("--max-concurrency", type=int, default=None, help="cap on in-flight requests in --rate mode")
    a("--requests", type=int, default=16, help="measured requests per load point, scenario and repeat")
    a("--repeats", type=int, default=3, help="repeats of every load point")
    a("--warmup", type=int, default=2, help="warm-up requests per method, excluded from the results")
    a("--max-tokens", type=int, default=32, help="output tokens per request (fixed: ignore_eos + min_tokens)")
    a("--no-ignore-eos", action="store_true", help="let requests stop at EOS (output length then varies)")
    a("--image-size", action="append", type=_arg(workload.parse_size), default=[], metavar="WxH",
      help="synthetic image size N or WxH (repeatable: cycled; default 336)")  # fmt: skip
    a("--images", type=int, default=8, help="distinct seeded images in the pool")
    a("--prompt", default="Describe the image in detail.", help="text after the image")
    a("--seed", type=int, default=0, help="seed of images, mixes and arrivals")
    a("--timeout", type=float, default=120.0, help="per-request timeout in s")
    a("--max-requests", type=int, default=2000, help="hard limit on requests, warm-up included")
    a("--max-duration", type=float, default=1800.0, help="hard limit on the run's wall time in s")
    a("--slo", type=_slo, default=None, metavar="ttft=MS,tpot=MS,e2e=MS", help="goodput thresholds")
    a("--omit-none-field", action="store_true",
      help="send no 'mitigation' field for none (for servers that do not know it)")  # fmt: skip
    a("--allow-remote", action="store_true", help="allow a target that is not loopback")
    a("--out", type=Path, default=None, help="output folder (default loadtest-results/<UTC time>)")
    a("--no-progress", action="store_true", help="no progress bar (there is none when stderr is no terminal)")
    a("-v", "--verbose", action="store_true")
    return p


def scenarios(mitigations: list[str], mixes: list[dict[str, float]]) -> list[Scenario]:
    """``none`` first, then each method alone, then each mix."""
    names = [workload.BASELINE]
    for item in mitigations:
        names += [n for n in _csv(item) if n not in names]
    out = [Scenario(name=n, mix={n: 1.0}) for n in names]
    for mix in mixes:
        if len(mix) == 1:
            name = next(iter(mix))
            if name not in names:
                names.append(name)
                out.append(Scenario(name=name, mix=mix))
            continue
        label = workload.mix_label(mix)
        if all(s.name != label for s in out):
            out.append(Scenario(name=label, mix=mix))
    return out


def config_from_args(args: argparse.Namespace, model: str) -> LoadConfig:
    loads = [LoadPoint(kind="concurrency", value=c) for c in args.concurrency or []]
    loads += [LoadPoint(kind="rate", value=r, max_concurrency=args.max_concurrency) for r in args.rate or []]
    if not loads:
        loads = [LoadPoint(kind="concurrency", value=c) for c in (1, 4)]
    return LoadConfig(
        base_url=args.base_url, model=model, scenarios=scenarios(args.mitigation, args.mix), loads=loads,
        requests_per_point=args.requests, warmup=args.warmup, repeats=args.repeats,
        max_tokens=args.max_tokens,
        ignore_eos=not args.no_ignore_eos, image_sizes=args.image_size or [(336, 336)], images=args.images,
        prompt=args.prompt, seed=args.seed, request_timeout_s=args.timeout, max_requests=args.max_requests,
        max_duration_s=args.max_duration, omit_none_field=args.omit_none_field, slo=args.slo,
    )  # fmt: skip


async def _run(args: argparse.Namespace) -> tuple[Report, Path]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=None) as client:
        server = await describe_server(client, args.base_url)
        model = args.model
        if model is None:
            if not server:
                raise SystemExit(_no_server(args.base_url))
            try:
                model = server["models"]["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise SystemExit(f"no --model given and {args.base_url}/v1/models lists no model") from None
        cfg = config_from_args(args, model)
        planned = cfg.planned_requests()
        if planned > cfg.max_requests:
            raise SystemExit(f"the plan needs {planned} requests, above --max-requests {cfg.max_requests}")
        if not server:
            raise SystemExit(_no_server(args.base_url))
        refused = refused_methods(cfg, server)
        if refused:
            raise SystemExit(f"the server does not offer {', '.join(refused)} (GET /v1/mitigations)")
        logger.info("%d requests planned, %d scenarios", planned, len(cfg.scenarios))
        progress = None
        if not args.no_progress and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=planned, unit="req", desc="loadtest", file=sys.stderr)
        before = await engine_counters(client, args.base_url)
        try:
            points, totals = await Runner(cfg, client, progress).run()
        finally:
            if progress is not None:
                progress.close()
        count_reclaim(totals, before, await engine_counters(client, args.base_url))
    setup = client_setup() | server
    out = args.out or Path("loadtest-results") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Report(config=cfg, setup=setup, points=points, totals=totals), out


def _no_server(base_url: str) -> str:
    return f"no server answered at {base_url} (GET /v1/models, /version and /v1/mitigations all failed)"


def server_root(base_url: str) -> str:
    """The server root of ``--base-url``: an OpenAI-style ``.../v1`` (with or without ``/``) is cut."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1") if root.endswith("/v1") else root


def refused_methods(cfg: LoadConfig, server: dict[str, Any]) -> list[str]:
    """Methods of the plan the server's ``/v1/mitigations`` does not list as allowed (none if unknown)."""
    listing = server.get("mitigations", {}).get("data")
    if not isinstance(listing, list):
        return []
    offered = {row.get("method") for row in listing if isinstance(row, dict) and row.get("allowed", True)}
    planned = {name for scenario in cfg.scenarios for name in scenario.mix}
    return sorted(planned - offered - {workload.BASELINE})


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checks = [
        (args.requests >= 1, "--requests must be >= 1"),
        (args.repeats >= 1, "--repeats must be >= 1"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (args.max_tokens >= 1, "--max-tokens must be >= 1"),
        (args.images >= 1, "--images must be >= 1"),
        (args.timeout > 0, "--timeout must be > 0"),
        (1 <= args.max_requests <= MAX_REQUESTS_CEILING, f"--max-requests: 1..{MAX_REQUESTS_CEILING}"),
        (0 < args.max_duration <= MAX_DURATION_CEILING_S, f"--max-duration: (0, {MAX_DURATION_CEILING_S}]"),
        (args.max_concurrency is None or args.max_concurrency >= 1, "--max-concurrency must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    args.base_url = server_root(args.base_url)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # httpx logs every request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        check_target(args.base_url, args.allow_remote)
    except RemoteTargetError as e:
        parser.error(str(e))
    report_, out = asyncio.run(_run(args))
    paths = report.write_all(report_, out)
    print(report.markdown(report_))
    print("wrote " + ", ".join(str(p) for p in paths))
    t = report_.totals
    return 0 if t.sent and not t.errors and not t.truncated else 1
