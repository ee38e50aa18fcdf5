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


def _panels(report: EvalReport) -> list[tuple[str, dict[str, float]]]:
    """One ``(title, {mitigation label: percent})`` per plotted metric: CHAIR's, then POPE's per split."""
    labels = [m.label for m in report.mitigations]
    panels: list[tuple[str, dict[str, float]]] = []
    chair_rows = {g.mitigation: g for g in report.groups if g.task == "chair"}
    for key, name in (("chair_s", "CHAIR_S"), ("chair_i", "CHAIR_I"), ("recall", "recall"), ("f1", "F1")):
        if chair_rows:
            panels.append((f"CHAIR {name} (%)", _percent({m: chair_rows.get(m) for m in labels}, key)))
    pope_rows = {(g.split, g.mitigation): g for g in report.groups if g.task == "pope"}
    splits = list(dict.fromkeys(g.split for g in report.groups if g.task == "pope"))
    for key, name in (("accuracy", "accuracy"), ("f1", "F1")):
        for split in splits:
            rows = {m: pope_rows.get((split, m)) for m in labels}
            panels.append((f"POPE {split} {name} (%)", _percent(rows, key)))
    return panels


def _percent(rows: dict[str, GroupResult | None], key: str) -> dict[str, float]:
    """``key`` in percent for each mitigation whose row has it."""
    return {m: 100 * g.metrics[key] for m, g in rows.items() if g is not None and key in g.metrics}


#: Small multiples: panels per row, inches per panel column, inches per mitigation row.
PANEL_COLUMNS, PANEL_WIDTH_IN, ROW_HEIGHT_IN = 4, 3.4, 0.3


def plot(report: EvalReport, path: Path) -> Path:
    """Small multiples, one panel per metric (CHAIR's, then POPE accuracy and F1 per split): a
    horizontal bar per mitigation, in the report's order in every panel, with its value written
    beside it. The height grows with the number of mitigations, so 12 or more stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.label for m in report.mitigations]
    panels = _panels(report)
    if not panels or not labels:
        raise ValueError("nothing to plot")
    cols = min(PANEL_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    label_in = 0.09 * max(len(x) for x in labels) + 0.3  # room for the longest label on the left
    height = rows * (ROW_HEIGHT_IN * len(labels) + 0.9)
    fig, axes = plt.subplots(
        rows, cols, figsize=(label_in + PANEL_WIDTH_IN * cols, height), squeeze=False, sharey=True
    )
    ys = list(range(len(labels)))
    for ax, (title, values) in zip(axes.flat, panels, strict=False):
        heights = [values.get(m, 0.0) for m in labels]
        ax.barh(ys, heights, height=0.7, color=[f"C{i % 10}" for i in ys])
        for y, m in zip(ys, labels, strict=True):
            text = f"{values[m]:.1f}" if m in values else "n/a"
            ax.text(min(values.get(m, 0.0), 100) + 1, y, text, va="center", fontsize="x-small")
        ax.set_yticks(ys, labels, fontsize="small")
        ax.set_xlim(0, 115)
        ax.set_title(title, fontsize="small")
        ax.grid(axis="x", alpha=0.3)
    axes.flat[0].invert_yaxis()  # the first mitigation on top (shared by every panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
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
