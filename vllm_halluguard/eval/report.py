"""Score ``results.jsonl`` per (task, split, mitigation); write ``report.json``, ``.md`` and ``.png``.

Records carry their own ground truth (CHAIR objects, POPE question and label), so a report can be
rebuilt from an output folder alone (``halluguard-eval report --out OUT``). Only successful requests
are scored; errors are counted per group.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vllm_halluguard import __version__

from . import chair, pope
from .chair import normalize_image_id
from .records import RESULTS, Mitigation, Protocol, ResultRecord, Task, load_protocols, load_results

logger = logging.getLogger(__name__)

CHAIR_KEYS = ("chair_s", "chair_i", "recall", "precision", "f1", "mean_length")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class GroupResult(BaseModel):
    """Metrics of one mitigation on one task (and POPE split); fractions in [0, 1]."""

    task: Task
    split: str | None = None
    mitigation: str
    chair_variant: chair.Variant | None = None  # the CHAIR parser that scored this row
    n_planned: int | None = None  # from the protocol; None when the protocol is unknown
    n_ok: int
    n_errors: int
    n_missing: int | None = None  # planned but not in results.jsonl (an unfinished run)
    errors: dict[str, int] = {}
    error_example: str | None = None
    metrics: dict[str, float]
    mean_completion_tokens: float | None = None
    n_truncated: int = 0  # finish_reason == "length"
    applied: list[str] = []  # methods the server reported in its x-halluguard-mitigation header


class EvalReport(BaseModel):
    created: str
    protocols: dict[str, Protocol]
    mitigations: list[Mitigation]
    groups: list[GroupResult]
    n_records: int

    def group(self, task: str, mitigation: str, split: str | None = None) -> GroupResult:
        for g in self.groups:
            if (g.task, g.split, g.mitigation) == (task, split, mitigation):
                return g
        raise KeyError((task, split, mitigation))


def _applied_method(header: str | None) -> str | None:
    if header is None:
        return None
    try:
        value = json.loads(header)
    except json.JSONDecodeError:
        return header
    if isinstance(value, list):  # a composition: its members in the server's order
        return "+".join(str(v.get("method", v)) if isinstance(v, dict) else str(v) for v in value)
    return str(value.get("method", header)) if isinstance(value, dict) else str(value)


def _metrics(
    task: Task,
    ok: list[ResultRecord],
    answer_style: pope.AnswerStyle,
    variant: chair.Variant = "fixed",
) -> dict[str, float]:
    if not ok:
        return {}
    if task == "chair":
        objects = {normalize_image_id(r.image_id): frozenset(r.gt_objects or ()) for r in ok}
        gt = chair.CocoObjects(objects, variant)
        return chair.score([(r.image_id, r.text or "") for r in ok], gt).metrics()
    questions = [r.question for r in ok if r.question is not None]
    if len(questions) != len(ok):
        raise ValueError("a POPE record has no question")
    return pope.score(questions, [r.text or "" for r in ok], style=answer_style).metrics()


def _planned(protocol: Protocol | None) -> int | None:
    if protocol is None:
        return None
    return protocol.n_items // len(protocol.splits) if protocol.task == "pope" else protocol.n_items


def build_report(records: Iterable[ResultRecord], protocols: dict[str, Protocol]) -> EvalReport:
    """Group ``records`` (one per key) and score each group."""
    recs = list(records)
    mitigations: dict[str, Mitigation] = {}
    for p in protocols.values():
        mitigations.update({m.label: m for m in p.mitigations if m.label not in mitigations})
    for r in recs:
        if r.mitigation not in mitigations:
            mitigations[r.mitigation] = Mitigation(label=r.mitigation, spec=r.spec or "none")
    order = {label: i for i, label in enumerate(mitigations)}
    groups: dict[tuple[Task, str | None, str], list[ResultRecord]] = {}
    for r in recs:
        groups.setdefault((r.task, r.split, r.mitigation), []).append(r)
    # Every protocol mitigation gets a row, even before its first request.
    for p in protocols.values():  # keyed by p.task
        p_splits: list[str | None] = [*p.splits] if p.splits else [None]
        for split in p_splits:
            for m in p.mitigations:
                groups.setdefault((p.task, split, m.label), [])

    def sort_key(key: tuple[Task, str | None, str]) -> tuple[int, int, int]:
        task, split, label = key
        splits: list[str | None] = [*(protocols[task].splits if task in protocols else pope.SPLITS)]
        split_i = splits.index(split) if split in splits else (-1 if split is None else len(splits))
        return (0 if task == "chair" else 1, split_i, order[label])

    out: list[GroupResult] = []
    for key in sorted(groups, key=sort_key):
        task, split, label = key
        rs = groups[key]
        protocol = protocols.get(task)
        ok = [r for r in rs if r.ok]
        bad = [r for r in rs if not r.ok]
        style = protocol.answer_style if protocol and protocol.answer_style else "pope"
        variant = (protocol.chair_variant if protocol else None) or "fixed"
        tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
        planned = _planned(protocol)
        out.append(
            GroupResult(
                task=task,
                split=split,
                mitigation=label,
                chair_variant=variant if task == "chair" else None,
                n_planned=planned,
                n_ok=len(ok),
                n_errors=len(bad),
                n_missing=None if planned is None else max(planned - len(rs), 0),
                errors=dict(Counter(r.error or "?" for r in bad)),
                error_example=bad[0].detail if bad else None,
                metrics=_metrics(task, ok, style, variant),
                mean_completion_tokens=sum(tokens) / len(tokens) if tokens else None,
                n_truncated=sum(r.finish_reason == "length" for r in ok),
                applied=sorted({a for r in ok if (a := _applied_method(r.applied)) is not None}),
            )
        )
    return EvalReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        protocols=protocols,
        mitigations=list(mitigations.values()),
        groups=out,
        n_records=len(recs),
    )


def load_report(out: Path) -> EvalReport:
    """Rebuild the report of an output folder from its ``results.jsonl`` and ``runs.json``."""
    return build_report(load_results(out / RESULTS).values(), load_protocols(out))


# ------------------------------------------------------------------------------------ writing


def _pct(g: GroupResult, key: str) -> str:
    return f"{100 * g.metrics[key]:.1f}" if key in g.metrics else "–"


def _errors(g: GroupResult) -> str:
    text = ", ".join(f"{k}: {v}" for k, v in sorted(g.errors.items())) if g.errors else "0"
    return text + (f" (+{g.n_missing} not run)" if g.n_missing else "")


def _spec(m: Mitigation) -> str:
    return m.spec if isinstance(m.spec, str) else json.dumps(m.spec, separators=(",", ":"))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _protocol_md(p: Protocol) -> list[str]:
    rows: list[tuple[str, Any]] = [
        ("model", p.model),
        ("endpoint", p.base_url),
        ("prompt", json.dumps(p.prompt)),
        ("max tokens", p.max_tokens),
        ("decoding", f"greedy (temperature={p.temperature:g}), one image per request"),
        ("images", f"{p.n_sampled_images} (requested: {p.n_images or 'all'}, seed {p.seed})"),
        ("requests per mitigation", p.n_items),
        ("annotations", p.annotations),
    ]
    if p.task == "chair":
        rows.append(("captions (ground truth)", p.captions or "none: instance categories only"))
        rows.append(("CHAIR variant", f"{p.chair_variant or 'fixed'} (see docs/evaluation.md)"))
    else:
        rows += [
            ("splits", ", ".join(p.splits)),
            ("questions per image and split", f"{p.n_per_image} yes + {p.n_per_image} no"),
            ("answer parsing", p.answer_style),
        ]
    if p.omit_none_field:
        rows.append(("none", "sent without a mitigation field (the server default applies)"))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]


def markdown(report: EvalReport) -> str:
    lines = [
        "# Hallucination evaluation",
        "",
        f"Created {report.created} from {report.n_records} results by vllm-halluguard {__version__}. "
        "Metrics in %, over successful requests;",
        "`errors` counts failed requests (not scored) and requests not run yet.",
        "",
        "| mitigation | sent as |",
        "|---|---|",
        *(f"| {m.label} | `{_spec(m)}` |" for m in report.mitigations),
    ]
    chair_rows = [g for g in report.groups if g.task == "chair"]
    if chair_rows:
        variants = sorted({g.chair_variant or "fixed" for g in chair_rows})
        lines += ["", f"## CHAIR (variant `{', '.join(variants)}`)", ""]
        if "chair" in report.protocols:
            lines += [*_protocol_md(report.protocols["chair"]), ""]
        lines += [
            "| mitigation | n | CHAIR_S | CHAIR_I | recall | precision | F1 | mean length (words) "
            "| mean tokens | truncated | errors | applied |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in chair_rows:
            length = f"{g.metrics['mean_length']:.1f}" if g.metrics else "–"
            tokens = f"{g.mean_completion_tokens:.1f}" if g.mean_completion_tokens is not None else "–"
            lines.append(
                f"| {g.mitigation} | {g.n_ok} | {_pct(g, 'chair_s')} | {_pct(g, 'chair_i')} "
                f"| {_pct(g, 'recall')} | {_pct(g, 'precision')} | {_pct(g, 'f1')} | {length} | {tokens} "
                f"| {g.n_truncated} | {_errors(g)} | {', '.join(g.applied) or '–'} |"
            )
    pope_rows = [g for g in report.groups if g.task == "pope"]
    if pope_rows:
        lines += ["", "## POPE", ""]
        if "pope" in report.protocols:
            lines += [*_protocol_md(report.protocols["pope"]), ""]
        lines += [
            "| split | mitigation | n | accuracy | precision | recall | F1 | yes ratio | errors | applied |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in pope_rows:
            lines.append(
                f"| {g.split} | {g.mitigation} | {g.n_ok} | {_pct(g, 'accuracy')} | {_pct(g, 'precision')} "
                f"| {_pct(g, 'recall')} | {_pct(g, 'f1')} | {_pct(g, 'yes_ratio')} | {_errors(g)} "
                f"| {', '.join(g.applied) or '–'} |"
            )
    failed = [g for g in report.groups if g.error_example]
    if failed:
        lines += ["", "## Errors", ""]
        for g in failed:
            where = g.task + (f"/{g.split}" if g.split else "")
            example = (g.error_example or "").replace("\n", " ")[:200]
            lines.append(f"- {where} {g.mitigation}: {_errors(g)}; e.g. `{example}`")
    return "\n".join(lines) + "\n"


def plot(report: EvalReport, path: Path) -> Path:
    """Grouped bars of the headline metrics per mitigation: CHAIR, then POPE accuracy and F1 per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.label for m in report.mitigations]
    panels: list[tuple[str, list[str], dict[str, list[float]]]] = []
    chair_rows = {g.mitigation: g for g in report.groups if g.task == "chair"}
    if chair_rows:
        keys = ["chair_s", "chair_i", "recall", "f1"]
        values = {
            m: [100 * chair_rows[m].metrics.get(k, 0.0) if m in chair_rows else 0.0 for k in keys]
            for m in labels
        }
        panels.append(("CHAIR (%)", ["CHAIR_S", "CHAIR_I", "recall", "F1"], values))
    pope_rows = {(g.split, g.mitigation): g for g in report.groups if g.task == "pope"}
    splits = list(dict.fromkeys(g.split for g in report.groups if g.task == "pope"))
    for key, name in (("accuracy", "POPE accuracy (%)"), ("f1", "POPE F1 (%)")):
        if pope_rows:
            values = {
                m: [
                    100 * pope_rows[(s, m)].metrics.get(key, 0.0) if (s, m) in pope_rows else 0.0
                    for s in splits
                ]
                for m in labels
            }
            panels.append((name, [str(s) for s in splits], values))
    if not panels:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    width = 0.8 / max(len(labels), 1)
    for ax, (title, ticks, values) in zip(axes[0], panels, strict=True):
        for i, m in enumerate(labels):
            xs = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(ticks))]
            ax.bar(xs, values[m], width, label=m)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(report: EvalReport, out: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (when matplotlib is installed) ``report.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(report.model_dump_json(indent=2) + "\n")
    paths[1].write_text(markdown(report))
    try:
        if report.groups:
            paths.append(plot(report, out / "report.png"))
    except ImportError:
        logger.warning("matplotlib is not installed: no report.png")
    logger.info("report written to %s", paths[1])
    return paths
