"""Send the CHAIR / POPE requests of a run to an OpenAI-compatible server; append results as JSON lines.

Every finished request becomes one :class:`ResultRecord` line of ``OUT/results.jsonl``, keyed by
``(task, split, mitigation label, item id)``. A restarted run skips the keys already there, so a
crashed or interrupted run resumes where it stopped. Requests are greedy chat completions with the
image as a base64 data URL and the method in the ``mitigation`` field of the body. Connection
errors, timeouts, 429 and 5xx are retried with exponential backoff; other errors (e.g. a 400 for a
method the engine does not support) are recorded, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import openai
from pydantic import BaseModel, Field, model_validator

from . import chair, pope
from .chair import ImageId
from .dataset import CocoFolder, data_url

logger = logging.getLogger(__name__)

Task = Literal["chair", "pope"]
RESULTS = "results.jsonl"
RUNS = "runs.json"
HEADER = "x-halluguard-mitigation"
DEFAULT_PROMPTS: dict[str, str] = {
    "chair": "Please describe this image in detail.",
    "pope": "{question} Answer yes or no.",
}
DEFAULT_MAX_TOKENS: dict[str, int] = {"chair": 512, "pope": 16}
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


# ------------------------------------------------------------------------------------ requests


class RetryPolicy(BaseModel):
    """Retries (after the first attempt) for transient errors, waiting ``backoff_s * 2**k`` (capped)."""

    retries: int = Field(default=4, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); honours ``Retry-After``."""
        wait = self.backoff_s * 2 ** (attempt - 1)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff_s)


def classify(exc: BaseException) -> tuple[str, bool]:
    """``(error kind, retryable)`` of a request failure."""
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return "timeout", True
    if isinstance(exc, openai.APIConnectionError):
        return "connect", True
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return f"http_{status}", status == 429 or status >= 500
    return "protocol", False


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _detail(exc: BaseException) -> str:
    """The server's error message (of an OpenAI-shaped error body when it is one), else the text."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, dict) else None
            if isinstance(message, str):
                return message[:500]
        return str(body if body is not None else exc)[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


def request_body(mitigation: Mitigation, omit_none_field: bool) -> dict[str, Any]:
    """``extra_body``: the ``mitigation`` field, left out for ``none`` with ``omit_none_field``."""
    if mitigation.is_none and omit_none_field:
        return {}
    return {"mitigation": mitigation.spec}


async def send(
    client: openai.AsyncOpenAI,
    model: str,
    item: WorkItem,
    mitigation: Mitigation,
    max_tokens: int,
    policy: RetryPolicy,
    omit_none_field: bool = False,
) -> ResultRecord:
    """One greedy chat request with retries; never raises (failures become an error record)."""
    extra = request_body(mitigation, omit_none_field)
    rec = ResultRecord(
        task=item.task,
        split=item.split,
        mitigation=mitigation.label,
        item_id=item.item_id,
        image_id=item.image_id,
        spec=extra.get("mitigation"),
        ok=False,
        model=model,
        gt_objects=item.gt_objects,
        question=item.question,
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(Path(item.image))}},
                {"type": "text", "text": item.prompt},
            ],
        }
    ]
    start = time.perf_counter()
    for attempt in range(1, policy.retries + 2):
        rec.attempts = attempt
        try:
            async with asyncio.timeout(policy.timeout_s):
                raw = await client.chat.completions.with_raw_response.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]  # plain dicts for openai's TypedDicts
                    max_tokens=max_tokens,
                    temperature=0.0,
                    extra_body=extra or None,
                )
            reply = raw.parse()
        except Exception as exc:
            rec.error, rec.retryable = classify(exc)
            rec.detail = _detail(exc)
            if rec.retryable and attempt <= policy.retries:
                wait = policy.delay(attempt, _retry_after(exc))
                logger.debug("%s on %s; retry %d in %.2f s", rec.error, rec.key, attempt, wait)
                await asyncio.sleep(wait)
                continue
            break
        rec.applied = raw.headers.get(HEADER)
        if not reply.choices:
            rec.error, rec.retryable, rec.detail = "empty", False, "the reply has no choices"
            break
        choice = reply.choices[0]
        rec.ok, rec.error, rec.detail, rec.retryable = True, None, None, False
        rec.text = choice.message.content or ""
        rec.finish_reason = choice.finish_reason
        rec.completion_tokens = reply.usage.completion_tokens if reply.usage else None
        break
    rec.latency_s = time.perf_counter() - start
    rec.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    return rec


# ------------------------------------------------------------------------------------ the run


class RunConfig(BaseModel):
    """Everything the CLI passes to :func:`run`."""

    task: Task
    images: Path
    annotations: Path
    captions: Path | None = None
    out: Path
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str = "EMPTY"
    model: str | None = None
    mitigations: list[Mitigation]
    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n_images: int | None = Field(default=None, ge=1)
    seed: int = 0
    splits: list[pope.Split] = ["random", "popular", "adversarial"]
    n_per_image: int = Field(default=3, ge=1)
    answer_style: pope.AnswerStyle = "pope"
    chair_variant: chair.Variant = "fixed"
    concurrency: int = Field(default=8, ge=1)
    retry: RetryPolicy = RetryPolicy()
    retry_errors: bool = False
    omit_none_field: bool = False
    progress: bool = True


class RunSummary(BaseModel):
    planned: int  # items x mitigations
    skipped: int  # already in results.jsonl
    sent: int
    ok: int
    errors: dict[str, int]


class ProtocolMismatch(ValueError):
    """``OUT`` holds results of a different protocol (prompt, max tokens, sample, model, ...)."""


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL: a server root gets ``/v1`` appended."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def build_items(cfg: RunConfig, data: CocoFolder) -> tuple[list[WorkItem], int]:
    """The work items of the task and the number of distinct images they use."""
    prompt = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    if cfg.task == "chair":
        ids, gt = data.chair_items(cfg.n_images, cfg.seed, cfg.chair_variant)
        items = [
            WorkItem(
                task="chair",
                item_id=str(i),
                image_id=i,
                image=str(data.image_path(i)),
                prompt=prompt,
                gt_objects=sorted(gt[i]),
            )
            for i in ids
        ]
        return items, len(ids)
    if "{question}" not in prompt and "{object}" not in prompt:
        raise ValueError("a POPE prompt must contain {question} or {object}")
    questions = data.pope_questions(cfg.splits, cfg.n_images, cfg.seed, cfg.n_per_image)
    items = [
        WorkItem(
            task="pope",
            split=q.split,
            item_id=str(q.question_id),
            image_id=q.image_id,
            image=str(data.image_path(q.image_id)),
            prompt=prompt.format(question=q.text, object=q.object),
            question=q,
        )
        for q in questions
    ]
    return items, len({q.image_id for q in questions})


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


async def _first_model(client: openai.AsyncOpenAI) -> str:
    models = [m.id async for m in client.models.list()]
    if not models:
        raise ValueError("no --model given and the server's /v1/models lists none")
    return models[0]


async def run_async(cfg: RunConfig) -> RunSummary:
    """Run (or resume) ``cfg``: write ``runs.json`` and append to ``results.jsonl`` in ``cfg.out``."""
    labels = [m.label for m in cfg.mitigations]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate mitigation labels {labels}")
    data = CocoFolder.load(cfg.images, cfg.annotations, cfg.captions)
    items, n_images = build_items(cfg, data)
    base_url = normalize_base_url(cfg.base_url)
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.retry.timeout_s
    )
    try:
        model = cfg.model or await _first_model(client)
        protocol = Protocol(
            task=cfg.task,
            prompt=cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task],
            max_tokens=cfg.max_tokens or DEFAULT_MAX_TOKENS[cfg.task],
            n_images=cfg.n_images,
            n_sampled_images=n_images,
            n_items=len(items),
            seed=cfg.seed,
            splits=list(cfg.splits) if cfg.task == "pope" else [],
            n_per_image=cfg.n_per_image if cfg.task == "pope" else None,
            answer_style=cfg.answer_style if cfg.task == "pope" else None,
            chair_variant=cfg.chair_variant if cfg.task == "chair" else None,
            model=model,
            images=str(cfg.images),
            annotations=str(cfg.annotations),
            captions=str(cfg.captions) if cfg.captions else None,
            base_url=base_url,
            mitigations=cfg.mitigations,
            omit_none_field=cfg.omit_none_field,
        )
        protocols = load_protocols(cfg.out)
        protocols[cfg.task] = merge_protocol(protocols.get(cfg.task), protocol)
        save_protocols(cfg.out, protocols)
        return await _run_items(cfg, client, model, protocol.max_tokens, items)
    finally:
        await client.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a no-op when disabled or tqdm is not installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            logger.info("tqdm is not installed: no progress bar")
        else:
            return tqdm(total=total, desc=desc, unit="req")
    return _NoBar()


async def _run_items(
    cfg: RunConfig, client: openai.AsyncOpenAI, model: str, max_tokens: int, items: Sequence[WorkItem]
) -> RunSummary:
    path = cfg.out / RESULTS
    done = load_results(path)
    # Mitigation-major order keeps each method's requests together; a partial run still compares well
    # within a method. Items stay in sample order.
    todo = [
        (it, m)
        for m in cfg.mitigations
        for it in items
        if not is_done(done.get(item_key(it, m)), cfg.retry_errors)
    ]
    planned = len(items) * len(cfg.mitigations)
    logger.info(
        "%s: %d requests planned, %d already done, %d to send",
        cfg.task,
        planned,
        planned - len(todo),
        len(todo),
    )
    summary = RunSummary(planned=planned, skipped=planned - len(todo), sent=0, ok=0, errors={})
    if not todo:
        return summary
    queue: asyncio.Queue[tuple[WorkItem, Mitigation]] = asyncio.Queue()
    for pair in todo:
        queue.put_nowait(pair)
    writer = ResultWriter(path)
    bar = _progress(len(todo), cfg.task, cfg.progress)

    async def worker() -> None:
        while True:
            try:
                item, mitigation = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            rec = await send(client, model, item, mitigation, max_tokens, cfg.retry, cfg.omit_none_field)
            writer.write(rec)
            summary.sent += 1
            if rec.ok:
                summary.ok += 1
            else:
                summary.errors[rec.error or "?"] = summary.errors.get(rec.error or "?", 0) + 1
                logger.debug("error %s on %s: %s", rec.error, rec.key, rec.detail)
            bar.update()

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(todo)))))
    finally:
        bar.close()
        writer.close()
    if summary.errors:
        logger.warning(
            "%s: %d of %d requests failed: %s",
            cfg.task,
            sum(summary.errors.values()),
            summary.sent,
            summary.errors,
        )
    return summary


def run(cfg: RunConfig) -> RunSummary:
    """Synchronous wrapper of :func:`run_async`."""
    return asyncio.run(run_async(cfg))
