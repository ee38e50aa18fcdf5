"""ASGI middleware installed with vLLM's ``--middleware server.middleware.MitigationMiddleware``.

It is outermost, so it sees every request first:

* **API key**: with ``--api-key`` every route needs it except :data:`server.security.OPEN_PATHS`
  (vLLM's own check guards only some path prefixes).
* **JSON bodies** are parsed strictly (nesting limit, no non-finite numbers, no lone surrogates, a
  bounded ``model``): a violation is a 400. Bodies of any type over :data:`MAX_BODY` are a 413.
* **Routes**: WebSocket upgrades only on WebSocket routes; on a server that forces a mitigation, the
  model-running routes without the field (:data:`UNMITIGATED`) are a 400.
* **Generation routes** (:data:`GENERATION`: chat, completions, batch chat, responses, messages and
  ``/invocations``, dispatched by body shape like vLLM does) get the ``mitigation`` field: it is
  resolved (or the server default) with :class:`server.mitigation.Resolver` and the body rewritten so
  that vLLM's own ``vllm_xargs`` carries ``{"halluguard": "<canonical config JSON>"}`` into
  ``SamplingParams.extra_args``; the response carries the chosen config in ``x-halluguard-mitigation``.
  Media URLs are checked (:func:`server.security.check_media`) and inline images against the server's
  limits (:mod:`server.inputs`), on every route that takes media. Every other route refuses a body that
  sets the field (400 naming it). The echo header and the request counter are set only on answers
  below 400.

At startup (ASGI lifespan) it binds the policy to the served model (``app.state.vllm_config``), guards
vLLM's media connector in this process and adds ``GET /v1/mitigations`` to vLLM's router. 5xx answers
are counted in ``halluguard_request_errors_total`` (``http_<status>``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.routing import Match, WebSocketRoute

from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY
from vllm_halluguard.methods import cut
from vllm_halluguard.server import engine_stats, security
from vllm_halluguard.server.inputs import ImageLimits, InputError, any_image, has_image
from vllm_halluguard.server.mitigation import (
    FIELD,
    NONE,
    MitigationError,
    Policy,
    Resolver,
    header_value,
    known_names,
)

logger = logging.getLogger("vllm.halluguard.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT = "/v1/chat/completions"
#: Routes that generate text, by the kind of body they take (``invocations``: chat or completion).
GENERATION = {
    CHAT: "chat",
    "/v1/completions": "completion",
    "/v1/chat/completions/batch": "batch",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/invocations": "invocations",
}
#: vLLM routes that run the model but take no ``mitigation`` field (generative scoring, the token-in
#: generate API, Cohere chat, structured decisions, speech, pooling). A server that forces a mitigation
#: (``none`` not in ``--mitigation-allow``) refuses them; elsewhere they run unmitigated.
UNMITIGATED = frozenset(
    {
        "/generative_scoring",
        "/inference/v1/generate",
        "/cohere/v2/chat",
        "/v1/systemone",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/realtime",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/v1/embeddings",
        "/v2/embed",
    }
)
#: Routes vLLM mounts whatever the model, answering 501 when the model does not serve them, by the
#: ``app.state`` attribute that holds their handler: a 404 here.
UNSERVED_WITHOUT = {"/v1/systemone": "serving_structured_decisions"}
#: Longest error message this layer sends (user values in it are cut to 200 characters each).
MAX_MESSAGE = 2000
HEADER = b"x-halluguard-mitigation"
MAX_BODY = 64 * 1024 * 1024
#: Longest ``model`` value accepted (vLLM logs and echoes it).
MAX_MODEL_NAME = 512
_BOOL = TypeAdapter(bool)

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


def error_body(
    message: str, param: str | None = FIELD, status: int = 400, err_type: str = "BadRequestError"
) -> bytes:
    """vLLM's / OpenAI's error shape."""
    error = {"message": cut(message, MAX_MESSAGE), "type": err_type, "param": param, "code": status}
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
        self.media = security.MediaPolicy()
        self.metrics_open = security.metrics_open()
        self._auth: Any = None  # vLLM's AuthenticationMiddleware, used only for verify_token
        self._cors = False  # vLLM's CORS middleware has allowed origins: it answers preflights
        self._routes_dumped = False
        self._ws_routes: list[WebSocketRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                self._setup(scope.get("app"))
            except Exception as e:
                logger.error("halluguard: invalid mitigation settings: %s", e)
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"halluguard: {e}"})
                return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = _path(scope)
        app = scope.get("app")
        if not self._routes_dumped:
            self._dump_routes(app)
        if not self._authorized(scope, path):
            await self._unauthorized(scope, send)
            return
        if scope["type"] == "websocket" and not self._websocket_route(scope, app):
            await send({"type": "websocket.close", "code": 1008})  # before accept: an HTTP 403
            return
        refusal = self._route_refusal(path, app)
        if scope["type"] == "websocket":
            if refusal is not None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await _forward(self.app, scope, receive, send)
            return
        if refusal is not None:
            await self._reject(send, refusal[1], refusal[0])
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            too_large = InputError(f"request body over {MAX_BODY} bytes", "too_large", None)
            await self._reject(send, too_large, 413)
            return
        if scope["method"] in ("POST", "PUT", "PATCH") and _is_json(scope):
            await self._json_request(scope, receive, send, path)
            return
        if path in security.METRICS_PATHS:
            await engine_stats.refresh(app)
        await _forward(self.app, scope, _capped(receive), send)

    def _websocket_route(self, scope: Scope, app: Any) -> bool:
        """Whether a WebSocket scope is for one of the app's WebSocket routes."""
        if self._ws_routes is None:
            routes = getattr(app, "routes", None) or []
            self._ws_routes = [r for r in routes if isinstance(r, WebSocketRoute)]
        return any(route.matches(scope)[0] == Match.FULL for route in self._ws_routes)

    def _route_refusal(self, path: str, app: Any) -> tuple[int, MitigationError | InputError] | None:
        """``(status, error)`` for a route refused whatever the body: a model-running route without the
        field on a server that forces a mitigation (400), a route the model does not serve (404)."""
        attr = UNSERVED_WITHOUT.get(path)
        if attr is not None and getattr(getattr(app, "state", None), attr, True) is None:
            return 404, InputError(f"{path} is not served by this model", "not_served", None)
        allow = self.resolver.policy.allow if self.resolver is not None else None
        if path in UNMITIGATED and allow is not None and NONE not in allow:
            msg = (
                f"this server requires a mitigation ('{NONE}' is not allowed) and {cut(path, 100)} runs the "
                f"model without one; generation routes: {', '.join(GENERATION)}"
            )
            return 400, MitigationError(msg, "unmitigated_route")
        return None

    # ------------------------------------------------------------------------------------ startup

    def _setup(self, app: Any) -> None:
        if self.resolver is not None or app is None:
            return
        vllm_config = app.state.vllm_config
        self.limits = ImageLimits.from_env()
        model_config = vllm_config.model_config
        self.media = security.MediaPolicy.from_env(
            domains=getattr(model_config, "allowed_media_domains", None),
            local_path=getattr(model_config, "allowed_local_media_path", None),
        )
        security.install_connector_guard(self.media)
        self.resolver = Resolver(
            Policy.from_env(),
            model_config.hf_config,
            str(vllm_config.cache_config.cache_dtype),
            vllm_config,
        )
        resolver = self.resolver
        from vllm import envs
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        args = getattr(app.state, "args", None)
        self._cors = bool(getattr(args, "allowed_origins", None))
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
        logger.info(
            "halluguard: API key %s (open: %s), media: %s",
            "required" if self._auth is not None else "not set",
            sorted(security.OPEN_PATHS | (security.METRICS_PATHS if self.metrics_open else set())),
            self.media.describe(),
        )

    def _dump_routes(self, app: Any) -> None:
        """Write the app's routes to ``$HALLUGUARD_ROUTES_FILE`` (tests check auth on each of them)."""
        self._routes_dumped = True
        target = os.environ.get(security.ROUTES_FILE_ENV)
        if not target or app is None:
            return
        routes = [
            {
                "path": route.path,
                "methods": sorted(getattr(route, "methods", None) or []),
                "kind": type(route).__name__,
            }
            for route in app.routes
            if getattr(route, "path", None) is not None
        ]
        with open(target, "w", encoding="utf-8") as fh:
            json.dump(routes, fh)

    # --------------------------------------------------------------------------------------- auth

    def _authorized(self, scope: Scope, path: str) -> bool:
        if self._auth is None or security.is_open(path, self.metrics_open):
            return True
        headers = Headers(scope=scope)
        if (
            self._cors
            and scope.get("method") == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        ):  # a CORS preflight: vLLM's CORS middleware answers it itself, the route never runs
            return True
        return bool(self._auth.verify_token(headers))

    async def _unauthorized(self, scope: Scope, send: Send) -> None:
        ERRORS.labels(reason="unauthorized").inc()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = error_body(
            "a valid API key is required (Authorization: Bearer <key>)", None, 401, "AuthenticationError"
        )
        await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])

    # ---------------------------------------------------------------------------------- requests

    async def _json_request(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        start = time.perf_counter()
        body, disconnected, complete = await _read_body(receive)
        if disconnected:
            return
        if not complete:
            await self._reject(
                send, InputError(f"request body over {MAX_BODY} bytes", "too_large", None), 413
            )
            return
        try:
            payload = security.load_json(body) if body else None
        except InputError as e:
            await self._reject(send, e)
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = None  # not our business: vLLM answers malformed bodies itself
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(model, str) and len(model) > MAX_MODEL_NAME:
            error = InputError(f"'model' is over {MAX_MODEL_NAME} characters", "model_name", "model")
            await self._reject(send, error)
            return
        kind = GENERATION.get(path)
        if kind == "invocations" and isinstance(payload, dict):  # vLLM tries chat, then completion
            kind = "chat" if "messages" in payload else "completion" if "prompt" in payload else None
        if not isinstance(payload, dict) or self.resolver is None:
            await _forward(self.app, scope, _replay(body, receive), send)
            return
        if kind is None:
            if _sets_field(payload):
                msg = (
                    f"the {FIELD!r} field (and vllm_xargs.{EXTRA_ARGS_KEY}) is not supported on "
                    f"{cut(path, 100)}; generation routes: {', '.join(GENERATION)}"
                )
                await self._reject(send, MitigationError(msg, "unsupported_route"))
                return
            try:  # tokenize, render, pooling ... parse chat messages and media too
                security.check_media(payload, self.media)
                self.limits.check_body(payload)
            except InputError as e:
                await self._reject(send, e)
                return
            await _forward(self.app, scope, _replay(body, receive), send)
            return
        try:
            cfg = self._check(payload, kind)
        except (MitigationError, InputError) as e:
            logger.debug("halluguard: rejected body of %d bytes on %s", len(body), cut(path, 100))
            await self._reject(send, e)
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
        tap = _ResponseTap(send, header_value(cfg).encode(), method, start, bool(payload.get("stream")))
        await _forward(self.app, scope, _replay(body, receive), tap.send)

    def _check(self, payload: dict[str, Any], kind: str) -> Any:
        """Validate a generation body: internal keys, media, the field (or default), beam search, images."""
        assert self.resolver is not None
        _check_internal_keys(payload)
        security.check_media(payload, self.media)
        conversations: list[Any] = []
        if kind == "chat":
            conversations = [payload]
        elif kind == "batch" and isinstance(payload.get("messages"), list):
            conversations = [{"messages": c} for c in payload["messages"] if isinstance(c, list)]
        image: bool | None = None  # unknown: the engine checks at admission
        if kind in ("chat", "batch"):
            image = bool(conversations) and all(has_image(c) for c in conversations)
        elif kind == "completion":
            image = False
        elif kind == "messages" or (kind == "responses" and _stateless_response(payload)):
            image = any_image(payload.get("messages" if kind == "messages" else "input"))
        cfg, _named = self.resolver.for_request(payload, has_image=image)
        if cfg is not None and _beam_search(payload.get("use_beam_search", False)):
            raise MitigationError(
                "mitigation methods do not run under beam search: drop use_beam_search or send "
                f"'{FIELD}': 'none'",
                "beam_search",
            )
        self.limits.check_body(payload)
        return cfg

    async def _reject(self, send: Send, error: MitigationError | InputError, status: int = 400) -> None:
        ERRORS.labels(reason=error.reason).inc()
        param: str | None
        if isinstance(error, MitigationError):
            message, param = f"invalid mitigation: {error}", FIELD
        else:
            message, param = str(error), error.param
        logger.info("halluguard: rejected request (%s): %s", error.reason, security.loggable(message, 300))
        await send_json(send, status, error_body(message, param, status), [])


def _beam_search(value: Any) -> bool:
    """``use_beam_search`` read as vLLM's pydantic model reads it (``"false"``, ``0`` are False); a value
    it would refuse is left to it (False here)."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


def _stateless_response(payload: Mapping[str, Any]) -> bool:
    """Whether a Responses body carries its whole input (no stored response, conversation or prompt
    template that could hold an image)."""
    return not any(payload.get(key) for key in ("previous_response_id", "conversation", "prompt"))


def _capped(receive: Receive) -> Receive:
    """``receive`` that ends the request (``http.disconnect``) once the body passes :data:`MAX_BODY`."""
    size = 0

    async def capped() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > MAX_BODY:
                return {"type": "http.disconnect"}
        return message

    return capped


def _is_json(scope: Scope) -> bool:
    """A body FastAPI would parse as JSON: a JSON content type, or none at all."""
    content_type = Headers(scope=scope).get("content-type", "")
    return not content_type or "json" in content_type.lower()


def _sets_field(payload: Mapping[str, Any]) -> bool:
    """Whether a body sets the field or has a ``halluguard*`` key at any depth.

    Any depth: routes such as ``/inference/v1/generate`` take ``sampling_params.extra_args`` directly.
    """
    if FIELD in payload:
        return True
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(isinstance(k, str) and k.lower().startswith("halluguard") for k in item):
                return True
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    return False


def _check_internal_keys(payload: Mapping[str, Any]) -> None:
    """Clients may set ``vllm_xargs.halluguard`` only: other ``halluguard*`` keys are the plugin's."""
    xargs = payload.get("vllm_xargs")
    for where, keys in (("", payload), ("vllm_xargs.", xargs if isinstance(xargs, Mapping) else {})):
        for key in keys:
            if (
                isinstance(key, str)
                and key.lower().startswith("halluguard")
                and (where, key)
                != (
                    "vllm_xargs.",
                    EXTRA_ARGS_KEY,
                )
            ):
                raise MitigationError(
                    f"{where}{cut(key, 60)} is not a key clients may set (use '{FIELD}' or "
                    f"vllm_xargs.{EXTRA_ARGS_KEY})",
                    "internal_key",
                )


#: Error bodies from vLLM larger than this are shortened (vLLM quotes some request values in full).
MAX_ERROR_BODY = 16 * 1024


async def _forward(app: Callable[[Scope, Receive, Send], Awaitable[None]], scope: Scope, receive: Receive,
                   send: Send) -> None:  # fmt: skip
    """Call the app, counting 5xx answers and unhandled exceptions in the error metric.

    An error response (status >= 400) is held until complete; one over :data:`MAX_ERROR_BODY` has its
    message cut (:func:`_shorten_error`), so that no request value is reflected at full size.
    """
    status = 0
    held: Message | None = None
    chunks: list[bytes] = []

    async def tap(message: Message) -> None:
        nonlocal status, held
        if message["type"] == "http.response.start":
            status = message["status"]
            if status >= 500:
                ERRORS.labels(reason=f"http_{status}").inc()
            if status >= 400:
                held = message
                return
        elif message["type"] == "http.response.body" and held is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _shorten_error(b"".join(chunks))
            start = dict(held)
            start["headers"] = [
                (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                for k, v in held.get("headers", [])
            ]
            held = None
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    try:
        await app(scope, receive, tap if scope["type"] == "http" else send)
    except Exception:
        if not status:
            ERRORS.labels(reason="unhandled_exception").inc()
        raise


def _shorten_error(body: bytes) -> bytes:
    """An error body cut to a bounded size: JSON string values cut to 1000 characters, else the bytes."""
    if len(body) <= MAX_ERROR_BODY:
        return body
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return body[:MAX_ERROR_BODY]
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            keys = item.keys() if isinstance(item, dict) else range(len(item))
            for key in keys:
                value = item[key]
                if isinstance(value, str):
                    item[key] = cut(value, 1000)
                else:
                    stack.append(value)
    shortened = json.dumps(payload).encode()
    return shortened if len(shortened) <= MAX_ERROR_BODY else shortened[:MAX_ERROR_BODY]


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


async def _read_body(receive: Receive) -> tuple[bytes, bool, bool]:
    """``(body, disconnected, complete)``; stops reading past :data:`MAX_BODY` (``complete=False``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return b"", False, False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False, True


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
            if self._status < 400:  # the echo and the count only for requests vLLM accepted
                REQUESTS.labels(method=self._method).inc()
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
            if self._status < 500:  # 5xx: counted by _forward
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
