"""The records of an evaluation run: what is asked, what came back, and the files that keep them.

``OUT/runs.json`` holds one :class:`Protocol` per task (what defines its numbers; a resumed run must
match it) and ``OUT/results.jsonl`` one :class:`ResultRecord` line per finished request, keyed by
``(task, split, mitigation label, item id)``; :class:`ResultWriter` appends them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from . import chair, pope
from .chair import ImageId

logger = logging.getLogger(__name__)

Task = Literal["chair", "pope"]
RESULTS = "results.jsonl"
RUNS = "runs.json"
_LABEL_RE = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$", re.S)


# ------------------------------------------------------------------------------------ mitigations


#: A ``mitigation`` value: a name, an object, or a list of them (a composition).
Spec = str | dict[str, Any] | list[str | dict[str, Any]]


class Mitigation(BaseModel):
    """One method to evaluate: a report label and the ``mitigation`` value sent (a name, an object or a
    list of them, which composes methods)."""

    label: str
    spec: Spec

    @property
    def is_none(self) -> bool:
        return self.spec == "none"


def _label_of(spec: str | dict[str, Any] | list[Any]) -> str:
    if isinstance(spec, list):
        return "+".join(_label_of(s) for s in spec)
    if isinstance(spec, str):
        return spec
    rest = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in spec.items() if k != "method"]
    return str(spec.get("method", "custom")) + (f"({','.join(rest)})" if rest else "")


def parse_mitigation(text: str) -> Mitigation:
    """``NAME``, ``{"method": ..., ...}``, a JSON list of them (a composition) or ``LABEL=NAME|JSON``
    -> :class:`Mitigation`.

    >>> parse_mitigation('fs-C={"method": "farsight", "mode": "C"}').label
    'fs-C'
    """
    text = text.strip()
    label = None
    m = _LABEL_RE.match(text)
    if m and not text.startswith(("{", "[")):
        label, text = m.group(1), m.group(2).strip()
    if text.startswith(("{", "[")):
        try:
            spec: str | dict[str, Any] | list[Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"mitigation {text!r} is not valid JSON: {e}") from None
        items = spec if isinstance(spec, list) else [spec]
        if not items or not all(
            isinstance(s, str) or (isinstance(s, dict) and isinstance(s.get("method"), str)) for s in items
        ):
            raise ValueError(
                f"a JSON mitigation must be an object with a 'method' string or a list of names and such "
                f"objects, got {text!r}"
            )
    elif re.fullmatch(r"[A-Za-z0-9_.+-]+", text):
        spec = text
    else:
        raise ValueError(f"mitigation {text!r}: expected a method name, a JSON object or LABEL=SPEC")
    return Mitigation(label=label or _label_of(spec), spec=spec)


# ------------------------------------------------------------------------------------ records


class Protocol(BaseModel):
    """What defines the numbers of one task; a resumed run must match it (mitigations may be added)."""

    task: Task
    prompt: str
    max_tokens: int = Field(ge=1)
    temperature: float = 0.0
    n_images: int | None  # requested (None: every eligible image)
    n_sampled_images: int
    n_items: int  # per mitigation: images (CHAIR) or questions over all splits (POPE)
    seed: int
    splits: list[pope.Split] = []
    n_per_image: int | None = None
    answer_style: pope.AnswerStyle | None = None
    chair_variant: chair.Variant | None = None  # CHAIR parser; it also parses the ground-truth captions
    model: str
    images: str
    annotations: str
    captions: str | None = None
    base_url: str
    mitigations: list[Mitigation]
    omit_none_field: bool = False

    @model_validator(mode="after")
    def _chair_variant_default(self) -> Protocol:
        # Folders written before the variant was recorded were parsed with the default.
        if self.task == "chair" and self.chair_variant is None:
            self.chair_variant = "fixed"
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The fields that must not change between a run and its resumption."""
        return self.model_dump(exclude={"base_url", "mitigations", "images", "annotations", "answer_style"})


class WorkItem(BaseModel):
    """One prompt about one image, before a mitigation is chosen."""

    task: Task
    split: str | None = None
    item_id: str
    image_id: ImageId
    image: str  # file path
    prompt: str
    gt_objects: list[str] | None = None  # CHAIR ground truth (category node words)
    question: pope.PopeQuestion | None = None


class ResultRecord(BaseModel):
    """One finished request (a line of ``results.jsonl``); carries what its scoring needs."""

    task: Task
    split: str | None = None
    mitigation: str  # label
    item_id: str
    image_id: ImageId
    spec: Spec | None  # the ``mitigation`` value sent (None: the field was omitted)
    ok: bool
    text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None  # http_<status>, timeout, connect, protocol, empty
    detail: str | None = None
    retryable: bool = False  # the error was transient (retried until the limit)
    attempts: int = 1
    latency_s: float = 0.0
    applied: str | None = None  # the server's x-halluguard-mitigation response header
    model: str | None = None
    gt_objects: list[str] | None = None
    question: pope.PopeQuestion | None = None
    finished_at: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.task, self.split or "", self.mitigation, self.item_id)


def item_key(item: WorkItem, mitigation: Mitigation) -> tuple[str, str, str, str]:
    return (item.task, item.split or "", mitigation.label, item.item_id)


def load_results(path: Path) -> dict[tuple[str, str, str, str], ResultRecord]:
    """The records of ``path`` by key (a later line wins); unreadable lines are skipped with a warning."""
    records: dict[tuple[str, str, str, str], ResultRecord] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = ResultRecord.model_validate_json(line)
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped (interrupted write?)", path, n)
                continue
            records[rec.key] = rec
    return records


def is_done(rec: ResultRecord | None, retry_errors: bool) -> bool:
    """Successes and permanent errors are done; transient errors (and, with ``retry_errors``, all) are not."""
    if rec is None:
        return False
    return rec.ok or (not rec.retryable and not retry_errors)


class ResultWriter:
    """Appends records to ``results.jsonl``, one flushed line each (repairs a torn last line first)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if torn:
            self._f.write("\n")

    def write(self, rec: ResultRecord) -> None:
        self._f.write(rec.model_dump_json() + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ProtocolMismatch(ValueError):
    """``OUT`` holds results of a different protocol (prompt, max tokens, sample, model, ...)."""


def load_protocols(out: Path) -> dict[str, Protocol]:
    path = out / RUNS
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {task: Protocol.model_validate(p) for task, p in raw.items()}


def save_protocols(out: Path, protocols: dict[str, Protocol]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {task: p.model_dump(mode="json") for task, p in protocols.items()}
    (out / RUNS).write_text(json.dumps(data, indent=2) + "\n")


def merge_protocol(old: Protocol | None, new: Protocol) -> Protocol:
    """``new`` plus the mitigations of ``old``; raises :class:`ProtocolMismatch` if the protocol changed."""
    if old is None:
        return new
    a, b = old.fingerprint(), new.fingerprint()
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise ProtocolMismatch(
            f"{new.task} results in this folder used another protocol ({diffs}); use a new --out"
        )
    mitigations = {m.label: m for m in old.mitigations}
    for m in new.mitigations:
        if m.label in mitigations and mitigations[m.label].spec != m.spec:
            raise ProtocolMismatch(
                f"label {m.label!r} was {mitigations[m.label].spec!r} here, now {m.spec!r}; use another label"
            )
        mitigations[m.label] = m
    return new.model_copy(update={"mitigations": list(mitigations.values())})
