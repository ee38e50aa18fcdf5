"""One streamed chat request -> its timings; and the loopback guard for targets."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

logger = logging.getLogger(__name__)


class RequestRecord(BaseModel):
    """Client-side timings of one request (seconds, ``time.perf_counter`` based)."""

    mitigation: str
    ok: bool
    error: str | None = None  # error kind: http_<status>, timeout, connect, protocol, ...
    detail: str | None = None  # first bytes of the error message
    start: float  # perf_counter at send
    ttft: float | None = None  # send -> first chunk carrying generated output
    e2e: float | None = None  # send -> end of stream
    itl: list[float] = []  # gaps between consecutive output chunks
    chunk_tokens: list[int] = []  # tokens carried by each output chunk (1 each without usage stats)
    output_tokens: int | None = None  # usage.completion_tokens (or the chunks' tokens when absent)
    prompt_tokens: int | None = None

    @property
    def chunks(self) -> int:
        """Output-carrying chunks."""
        return len(self.chunk_tokens)

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); only for outputs longer than one token."""
        if not self.ok or self.ttft is None or self.e2e is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class RemoteTargetError(ValueError):
    """The target does not resolve to loopback and ``--allow-remote`` was not given."""


def is_loopback_host(host: str) -> bool:
    """True when every address ``host`` resolves to is loopback (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    if not infos:
        return False
    for *_, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not addr.is_loopback:
            return False
    return True


def check_target(base_url: str, allow_remote: bool) -> None:
    """Refuse non-loopback targets unless ``allow_remote``; raises :class:`RemoteTargetError`."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteTargetError(f"not an http(s) URL: {base_url!r}")
    if allow_remote:
        logger.warning("load-testing %s: loopback guard disabled by --allow-remote", parts.hostname)
        return
    if not is_loopback_host(parts.hostname):
        raise RemoteTargetError(
            f"{parts.hostname!r} does not resolve to loopback only (127.0.0.0/8, ::1); "
            "pass --allow-remote to load-test it anyway"
        )


def _carries_output(chunk: dict[str, Any]) -> bool:
    """True for a chunk that streams generated output.

    vLLM streams a chunk per engine step, with ``content`` possibly empty (a token that does not
    complete a character yet); when the HTTP consumer falls behind the engine, vLLM merges the
    pending deltas into one chunk. The opening ``role`` chunk and the closing usage chunk carry none.
    """
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if "role" in delta:
            continue
        if any(isinstance(delta.get(k), str) for k in ("content", "reasoning_content", "reasoning")):
            return True
    return False


async def send(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], mitigation: str, timeout_s: float
) -> RequestRecord:
    """POST ``body`` (a streaming chat request) and time its server-sent events; never raises."""
    start = time.perf_counter()
    rec = RequestRecord(mitigation=mitigation, ok=False, start=start)
    last: float | None = None
    done = False
    usage: dict[str, Any] | None = None
    streamed = 0  # completion tokens accounted for by the output chunks so far
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                rec.error, rec.detail = f"http_{resp.status_code}", raw[:300].decode(errors="replace")
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:  # vLLM reports errors raised mid-stream as an event
                    rec.error, rec.detail = "stream_error", str(event["error"])[:300]
                    return rec
                now = time.perf_counter()
                if event.get("usage"):
                    usage = event["usage"]
                if _carries_output(event):
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    # Continuous usage stats give the running completion count on every chunk.
                    total = (event.get("usage") or {}).get("completion_tokens")
                    carried = total - streamed if isinstance(total, int) else 1
                    rec.chunk_tokens.append(carried)
                    streamed += carried
        end = time.perf_counter()
    except TimeoutError:
        rec.error, rec.detail = "timeout", f"no complete response within {timeout_s:g} s"
        return rec
    except httpx.ConnectError as e:
        rec.error, rec.detail = "connect", str(e)[:300]
        return rec
    except httpx.HTTPError as e:
        rec.error, rec.detail = "protocol", f"{type(e).__name__}: {e}"[:300]
        return rec
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rec.error, rec.detail = "bad_event", str(e)[:300]
        return rec
    if not done:
        rec.error, rec.detail = "incomplete_stream", "stream ended without [DONE]"
        return rec
    if rec.ttft is None:
        rec.error, rec.detail = "no_output", "stream carried no generated output"
        return rec
    rec.ok, rec.e2e = True, end - start
    if usage:
        rec.output_tokens = usage.get("completion_tokens")
        rec.prompt_tokens = usage.get("prompt_tokens")
    if rec.output_tokens is None:
        rec.output_tokens = sum(rec.chunk_tokens)
    return rec
