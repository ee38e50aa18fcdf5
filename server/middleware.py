"""ASGI middleware installed with vLLM's ``--middleware server.middleware.MitigationMiddleware``.

On ``POST /v1/chat/completions`` and ``/v1/completions`` it reads the JSON body, resolves the top-level
``mitigation`` field (or the server default) with :class:`server.mitigation.Resolver`, and rewrites the
body so that vLLM's own ``vllm_xargs`` carries ``{"halluguard": "<canonical config JSON>"}`` into
``SamplingParams.extra_args``; vLLM then handles the request as usual. A bad value is answered here
with an OpenAI-shaped 400, and so are inline images over the server's limits and a method that needs an
image on a request without one (:mod:`server.inputs`). The response carries the chosen config in
``x-halluguard-mitigation``.

At startup (ASGI lifespan) it binds the policy to the served model (``app.state.vllm_config``, set by
vLLM before serving) and adds ``GET /v1/mitigations`` to vLLM's FastAPI router, so that route sits
behind vLLM's own middleware (API key included). Completion requests without a valid API key are passed
through unread, so vLLM's 401 comes before any mitigation error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers

from server.inputs import ImageLimits, InputError, has_image
from server.mitigation import FIELD, NONE, MitigationError, Policy, Resolver, header_value, known_names
from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY

logger = logging.getLogger("vllm.halluguard.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT = "/v1/chat/completions"
PATHS = frozenset({CHAT, "/v1/completions"})
HEADER = b"x-halluguard-mitigation"
MAX_BODY = 64 * 1024 * 1024

# vLLM's /metrics serves prometheus_client's default registry (or the multiprocess collector over it).
REQUESTS = Counter("halluguard_requests_total", "Accepted completion requests by method", ["method"])
ERRORS = Counter(
    "halluguard_request_errors_total",
    "Rejected mitigation values (reason) and error responses from vLLM (http_<status>)",
    ["reason"],
)
LATENCY = Histogram(
    "halluguard_request_latency_seconds",
    "Time from request to the last response byte, by method",
    ["method"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TOKENS = Counter(
    "halluguard_generated_tokens_total",
    "Generated tokens by method (from the response's usage; streams only with include_usage)",
    ["method"],
)


def error_body(message: str, param: str | None = FIELD, status: int = 400) -> bytes:
    """vLLM's / OpenAI's error shape."""
    error = {"message": message, "type": "BadRequestError", "param": param, "code": status}
    return json.dumps({"error": error}).encode()


async def send_json(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class MitigationMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.resolver: Resolver | None = None
        self.limits = ImageLimits()
        self._auth: Any = None  # vLLM's AuthenticationMiddleware, used only for verify_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                self._setup(scope.get("app"))
            except Exception as e:
                logger.error("halluguard: invalid mitigation settings: %s", e)
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"halluguard: {e}"})
                return
        elif scope["type"] == "http" and scope["method"] == "POST" and _path(scope) in PATHS:
            await self._completion(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------------------------ startup

    def _setup(self, app: Any) -> None:
        if self.resolver is not None or app is None:
            return
        vllm_config = app.state.vllm_config
        self.limits = ImageLimits.from_env()
        self.resolver = Resolver(
            Policy.from_env(),
            vllm_config.model_config.hf_config,
            str(vllm_config.cache_config.cache_dtype),
        )
        resolver = self.resolver
        # This middleware is outermost: leave requests without a valid API key untouched so that
        # vLLM's own AuthenticationMiddleware answers them (401) before anything is validated.
        from vllm import envs
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        args = getattr(app.state, "args", None)
        if tokens := [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]:
            self._auth = AuthenticationMiddleware(self.app, tokens=tokens)

        async def list_mitigations() -> dict[str, Any]:
            return resolver.describe()

        app.add_api_route("/v1/mitigations", list_mitigations, methods=["GET"], tags=["halluguard"])
        _document_field(app)
        logger.info(
            "halluguard: mitigation field enabled (default %s, allow %s, preset family %s, image limits %s)",
            header_value(resolver.default),
            "all" if resolver.policy.allow is None else sorted(resolver.policy.allow),
            resolver.family,
            self.limits.model_dump(),
        )

    # ---------------------------------------------------------------------------------- requests

    async def _completion(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        resolver = self.resolver
        if resolver is None or (
            self._auth is not None and not self._auth.verify_token(Headers(scope=scope))
        ):  # no lifespan (nothing to resolve against), or vLLM will answer 401
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        try:
            payload = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):  # not our business: vLLM answers malformed bodies itself
            await self.app(scope, _replay(body, receive), send)
            return
        chat = _path(scope) == CHAT
        try:
            cfg, _named = resolver.for_request(payload, has_image=has_image(payload) if chat else False)
            if chat:
                self.limits.check(payload)
        except MitigationError as e:
            ERRORS.labels(reason=e.reason).inc()
            logger.info("halluguard: rejected mitigation (%s): %s", e.reason, e)
            await send_json(send, 400, error_body(f"invalid mitigation: {e}"), [])
            return
        except InputError as e:
            ERRORS.labels(reason=e.reason).inc()
            logger.info("halluguard: rejected input (%s): %s", e.reason, e)
            await send_json(send, 400, error_body(str(e), e.param), [])
            return
        rewritten = _rewrite(payload, cfg)
        if rewritten is not None:
            body = rewritten
            scope = dict(scope)
            scope["headers"] = [
                (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                for k, v in scope["headers"]
            ]
        method = cfg.name if cfg is not None else NONE
        REQUESTS.labels(method=method).inc()
        tap = _ResponseTap(send, header_value(cfg).encode(), method, start, bool(payload.get("stream")))
        await self.app(scope, _replay(body, receive), tap.send)


def mitigation_schema() -> dict[str, Any]:
    """OpenAPI schema of the ``mitigation`` field (the per-method parameters: ``GET /v1/mitigations``)."""
    one = {
        "anyOf": [
            {"type": "string", "enum": known_names()},
            {
                "type": "object",
                "properties": {"method": {"type": "string", "enum": known_names()}},
                "required": ["method"],
                "additionalProperties": True,
            },
        ]
    }
    return {
        "description": "hallucination mitigation: a method name, {'method': name, ...params} or a list",
        "anyOf": [*one["anyOf"], {"type": "array", "items": one}, {"type": "null"}],
    }


def _document_field(app: Any) -> None:
    """Add ``mitigation`` to the request schemas of vLLM's ``/openapi.json`` (generated lazily)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        schema = original()
        components = schema.get("components", {}).get("schemas", {})
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            if name in components:
                components[name].setdefault("properties", {})[FIELD] = mitigation_schema()
        return schema

    app.openapi = openapi


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:  # let vLLM deal with it; we never hold more than this
            chunks.append(chunk)
            return b"".join(chunks), False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _rewrite(payload: dict[str, Any], cfg: Any) -> bytes | None:
    """Move the resolved config into ``vllm_xargs``; ``None`` when the body needs no change."""
    xargs = payload.get("vllm_xargs")
    if FIELD not in payload and cfg is None and not (isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs):
        return None
    payload.pop(FIELD, None)
    xargs = dict(xargs) if isinstance(xargs, dict) else {}
    if cfg is None:
        xargs.pop(EXTRA_ARGS_KEY, None)
    else:
        # vllm_xargs values must be flat (str/int/float/list): the config travels as its JSON text,
        # which vllm_halluguard.engine.requests.spec_of decodes.
        xargs[EXTRA_ARGS_KEY] = cfg.canonical()
    if xargs:
        payload["vllm_xargs"] = xargs
    else:
        payload.pop("vllm_xargs", None)
    return json.dumps(payload).encode()


class _ResponseTap:
    """Adds the echo header and records latency, error status and generated tokens on the way out."""

    def __init__(self, send: Send, header: bytes, method: str, start: float, stream: bool) -> None:
        self._send = send
        self._header = header
        self._method = method
        self._start = start
        self._stream = stream
        self._status = 0
        self._body: list[bytes] = []
        self._tokens: int | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            message = dict(message)
            message["headers"] = [*message.get("headers", []), (HEADER, self._header)]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if self._status == 200 and chunk:
                self._observe(chunk)
            if not message.get("more_body", False):
                self._finish()
        await self._send(message)

    def _observe(self, chunk: bytes) -> None:
        if not self._stream:
            self._body.append(chunk)
            return
        if b'"usage":{' not in chunk:
            return
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = _usage(line[len(b"data: ") :])
                if usage is not None:
                    self._tokens = usage

    def _finish(self) -> None:
        LATENCY.labels(method=self._method).observe(time.perf_counter() - self._start)
        if self._status >= 400:
            ERRORS.labels(reason=f"http_{self._status}").inc()
            return
        tokens = _usage(b"".join(self._body)) if not self._stream else self._tokens
        if tokens:
            TOKENS.labels(method=self._method).inc(tokens)


def _usage(raw: bytes) -> int | None:
    try:
        usage = json.loads(raw).get("usage")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("completion_tokens")
    return tokens if isinstance(tokens, int) else None
