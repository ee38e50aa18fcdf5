"""One evaluation request: a greedy chat completion with the image and the ``mitigation`` field, retried.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other errors (e.g. a
400 for a method the engine does not support) are recorded in the :class:`.ResultRecord`, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from pydantic import BaseModel, Field

from .dataset import data_url
from .records import Mitigation, ResultRecord, WorkItem

logger = logging.getLogger(__name__)

HEADER = "x-halluguard-mitigation"


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
                    messages=messages,  # type: ignore[arg-type]
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
