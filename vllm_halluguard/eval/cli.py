"""``halluguard-eval chair|pope|report``: run CHAIR / POPE against an OpenAI-compatible server, then report.

Examples::

    halluguard-eval chair --images val2014/ --annotations annotations/instances_val2014.json \\
        --captions annotations/captions_val2014.json --n-images 500 --mitigation none --mitigation kvsmooth
    halluguard-eval pope --images val2014/ --annotations annotations/instances_val2014.json --n-images 500
    halluguard-eval report --out eval-out
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import openai

from . import chair, pope
from .client import RetryPolicy
from .records import ProtocolMismatch, parse_mitigation
from .report import load_report, write_all
from .runner import DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS, RunConfig, run

logger = logging.getLogger(__name__)


def _add_run_options(p: argparse.ArgumentParser, task: str) -> None:
    a = p.add_argument
    a("--images", type=Path, required=True, help="folder with the image files named in the annotations")
    a(
        "--annotations",
        type=Path,
        required=True,
        help="COCO-format instances JSON (e.g. instances_val2014.json)",
    )
    if task == "chair":
        a(
            "--captions",
            type=Path,
            default=None,
            help="COCO captions JSON: adds caption objects to CHAIR ground truth",
        )
        a(
            "--chair-variant",
            choices=chair.VARIANTS,
            default="fixed",
            help="CHAIR parser: fixed (corrected, default), reference (the original's table quirks), "
            "original (reproduces the original scorer, errors included); see docs/evaluation.md",
        )
    a("--out", type=Path, default=Path("eval-out"), help="output folder (resumable; default: eval-out)")
    a("--base-url", default="http://127.0.0.1:8000/v1", help="server root or its /v1 URL")
    a(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        help="default: $OPENAI_API_KEY or EMPTY",
    )
    a("--model", default=None, help="model name (default: the first one /v1/models lists)")
    a(
        "--mitigation",
        dest="mitigations",
        action="append",
        default=None,
        metavar="SPEC",
        help='method name, JSON object (\'{"method": "farsight", "mode": "C"}\') or LABEL=SPEC; '
        "repeat for a side-by-side comparison (default: none)",
    )
    a("--omit-none-field", action="store_true", help="send 'none' as a request without the mitigation field")
    a("--prompt", default=None, help=f"default: {DEFAULT_PROMPTS[task]!r}")
    a("--max-tokens", type=int, default=None, help=f"default: {DEFAULT_MAX_TOKENS[task]}")
    a("--n-images", type=int, default=None, help="seeded sample of this many images (default: all)")
    a("--seed", type=int, default=0)
    if task == "pope":
        a(
            "--split",
            dest="splits",
            action="append",
            choices=pope.SPLITS,
            default=None,
            help="default: all three",
        )
        a("--n-per-image", type=int, default=3, help="yes (and as many no) questions per image and split")
        a("--answer-style", choices=("pope", "opera"), default="pope", help="yes/no parsing rule")
    a("--concurrency", type=int, default=8, help="requests in flight")
    a("--retries", type=int, default=4, help="retries on connection errors, timeouts, 429 and 5xx")
    a("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
    a("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    a("--retry-errors", action="store_true", help="on resume, also resend requests that failed with 4xx")
    a("--no-progress", action="store_true", help="no progress bar (there is none when stderr is no terminal)")
    a("--no-report", action="store_true", help="only run the requests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halluguard-eval",
        description="Evaluate hallucination mitigations (CHAIR, POPE) against an OpenAI-compatible server.",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_options(sub.add_parser("chair", help="caption images; score CHAIR"), "chair")
    _add_run_options(sub.add_parser("pope", help="ask POPE yes/no questions; score them"), "pope")
    rep = sub.add_parser("report", help="rebuild report.json/md/png from OUT/results.jsonl")
    rep.add_argument("--out", type=Path, default=Path("eval-out"))
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    try:
        mitigations = [parse_mitigation(m) for m in args.mitigations or ["none"]]
    except ValueError as e:
        raise SystemExit(f"halluguard-eval: {e}") from None
    extra = (
        {"captions": args.captions, "chair_variant": args.chair_variant} if args.command == "chair" else {}
    )
    if args.command == "pope":
        extra |= {
            "splits": args.splits or list(pope.SPLITS),
            "n_per_image": args.n_per_image,
            "answer_style": args.answer_style,
        }
    return RunConfig(
        task=args.command,
        images=args.images,
        annotations=args.annotations,
        out=args.out,
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        mitigations=mitigations,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        n_images=args.n_images,
        seed=args.seed,
        concurrency=args.concurrency,
        retry=RetryPolicy(retries=args.retries, backoff_s=args.backoff, timeout_s=args.timeout),
        retry_errors=args.retry_errors,
        omit_none_field=args.omit_none_field,
        progress=not args.no_progress and sys.stderr.isatty(),
        **extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # the HTTP client logs every request at INFO
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command != "report":
        cfg = config_from_args(args)
        try:
            summary = run(cfg)
        except (ProtocolMismatch, FileNotFoundError, ValueError) as e:
            logger.error("%s", e)
            return 2
        except openai.APIConnectionError:
            logger.error(
                "no server answered at %s (is it running? --base-url sets the address)", cfg.base_url
            )
            return 2
        except openai.APIStatusError as e:
            logger.error("the server at %s answered HTTP %d: %.200s", cfg.base_url, e.status_code, e.message)
            return 2
        logger.info(
            "%s: sent %d (ok %d, errors %s), skipped %d already done",
            cfg.task,
            summary.sent,
            summary.ok,
            summary.errors or 0,
            summary.skipped,
        )
        if args.no_report:
            return 0
    if not (args.out / "results.jsonl").exists():
        logger.error("%s has no results.jsonl", args.out)
        return 2
    paths = write_all(load_report(args.out), args.out)
    print(paths[1], file=sys.stdout)
    return 0
