"""Send the CHAIR / POPE requests of a run to an OpenAI-compatible server; append results as JSON lines.

Every finished request becomes one :class:`.ResultRecord` line of ``OUT/results.jsonl``
(:mod:`.records`), keyed by ``(task, split, mitigation label, item id)``. A restarted run skips the
keys already there, so a crashed or interrupted run resumes where it stopped. Each request is sent by
:func:`.client.send` (retries; failures become error records).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
from pydantic import BaseModel, Field

from . import chair, pope
from .client import RetryPolicy, send
from .dataset import CocoFolder
from .records import (
    RESULTS,
    Mitigation,
    Protocol,
    ResultWriter,
    Task,
    WorkItem,
    is_done,
    item_key,
    load_protocols,
    load_results,
    merge_protocol,
    save_protocols,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS: dict[str, str] = {
    "chair": "Please describe this image in detail.",
    "pope": "{question} Answer yes or no.",
}
DEFAULT_MAX_TOKENS: dict[str, int] = {"chair": 512, "pope": 16}


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
