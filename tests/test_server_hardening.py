"""The second round of attacks on the running server (issue 28, items 2-7), against one real server.

One ``halluguard-serve --fixture llava`` for the module (vLLM's multi-process layout, HTTP on 127.0.0.1)
with ``--api-key``, ``--metrics-require-key``, CORS origins, fetching on with ``127.0.0.2/32`` allowed,
a forced mitigation (``none`` not allowed), a small ``--max-image-bytes`` and 32-token KV blocks with
synchronous scheduling (so that PruneHal's reclaiming variant frees blocks). Two canary HTTP servers
record what the server fetched: one on 127.0.0.1 (refused) and one on 127.0.0.2 (allowed). Log checks
read the server's captured output from the byte offset before the request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from PIL import Image

from canary import Canary
from helpers.server import free_port, running_server, server_command
from vllm_halluguard.server import security
from vllm_halluguard.tiny_models import make_image

MODEL = "tiny-llava"
HEADER = "x-halluguard-mitigation"
API_KEY = "hg-hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORIGIN = "http://127.0.0.1:9"
#: Just over the tiny test image: a second, noisier image is over it.
MAX_IMAGE_BYTES = 4096
BLOCK = 32
#: PruneHal's reclaiming variant pruning llava's whole image: its image-only 32-token block goes back.
RECLAIM_ALL = {"method": "prunehal", "r": 0.3, "t": 1, "selection": "shared", "granularity": "block",
               "block": BLOCK}  # fmt: skip


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


SMALL = _png(make_image(0))
NOISY = _png(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)))
DATA_URL = "data:image/png;base64," + base64.b64encode(SMALL).decode()
NOISY_URL = "data:image/png;base64," + base64.b64encode(NOISY).decode()


def _chat(url: str = DATA_URL, **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _responses(url: str | None = DATA_URL, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "input_text", "text": "Describe."}]
    if url is not None:
        content.insert(0, {"type": "input_image", "image_url": url})
    return {"model": MODEL, "input": [{"role": "user", "content": content}], "max_output_tokens": 2,
            **extra}  # fmt: skip


def _anthropic_image(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        media, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _messages(url: str | None = DATA_URL, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe."}]
    if url is not None:
        content.insert(0, _anthropic_image(url))
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra}


#: Every route that takes media: (path, body with the image at ``url``).
MEDIA_ROUTES: dict[str, Callable[[str], dict[str, Any]]] = {
    "/v1/chat/completions": _chat,
    "/v1/responses": _responses,
    "/v1/messages": _messages,
    "/tokenize": lambda url: {"model": MODEL, "messages": _chat(url)["messages"]},
    "/v1/messages/count_tokens": lambda url: {"model": MODEL, "messages": _messages(url)["messages"]},
}


def _post(
    base: str, path: str, body: Any = None, *, data: bytes | None = None, **kw: Any
) -> requests.Response:
    headers = {**AUTH, "Content-Type": "application/json", **kw.pop("headers", {})}
    return requests.post(f"{base}{path}", json=body, data=data, headers=headers, timeout=120, **kw)


def _error(reply: requests.Response, status: int = 400, needle: str = "") -> dict[str, Any]:
    assert reply.status_code == status, (reply.status_code, reply.text[:2000])
    error = reply.json()["error"]
    assert needle in error["message"], error
    return error


def _metrics(base: str) -> dict[str, float]:
    values = {}
    reply = requests.get(f"{base}/metrics", headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text[:500]
    for line in reply.text.splitlines():
        if line.startswith("halluguard_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


class Served:
    """The running server: base URL, its log, the two canaries."""

    def __init__(self, url: str, log: Path, refused: Canary, allowed: Canary) -> None:
        self.url, self.log, self.refused, self.allowed = url, log, refused, allowed

    def log_since(self, offset: int) -> str:
        time.sleep(0.5)  # the API process flushes its log lines
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def offset(self) -> int:
        return self.log.stat().st_size


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("server_hardening")
    port, log = free_port(), tmp / "server.log"
    extra = [
        "--api-key", API_KEY, "--metrics-require-key", "--allowed-origins", json.dumps([ORIGIN]),
        "--allow-media-fetch", "--media-fetch-allow-net", "127.0.0.2/32", "--media-fetch-timeout", "5",
        "--mitigation-allow", "kvsmooth,farsight,scr,prunehal", "--default-mitigation", "farsight",
        "--max-image-bytes", str(MAX_IMAGE_BYTES),
        "--block-size", str(BLOCK), "--no-async-scheduling",
    ]  # fmt: skip
    with (
        Canary({"/x.png": SMALL}, host="127.0.0.1") as refused,
        Canary({"/x.png": SMALL}, host="127.0.0.2") as allowed,
        running_server(server_command(port, extra), port, log) as url,
    ):
        yield Served(url, log, refused, allowed)


# ------------------------------------------------------------------------- 2. one URL parse


def test_fetch_target_reads_the_host_vllm_connects_to():
    assert security.fetch_target("http://127.0.0.2:8598/x.png") == ("127.0.0.2", 8598)
    assert security.fetch_target("https://Example.com/a.png?x=@y") == ("example.com", 443)
    assert security.fetch_target("http://[2606:4700::1111]/a.png") == ("2606:4700::1111", 80)
    for url in (
        "http://127.0.0.1:8599\\@127.0.0.2:8598/x.png",  # urlsplit: 127.0.0.2; urllib3 / aiohttp: 127.0.0.1
        "http://127.0.0.1\\x.png",
        "http://user@127.0.0.2/x.png",
        "http://user:pw@127.0.0.2/x.png",
        "http://127.0.0.2 /x.png",
        "http://127.0.0.2/\tx.png",
        "http://ex%61mple.com/x.png",
        "http://exämple.com/x.png",
        "http://" + "a" * 3000 + ".com/",
    ):
        with pytest.raises(ValueError):
            security.fetch_target(url)
    on = security.MediaPolicy(fetch=True)
    with pytest.raises(security.MediaRefused, match="user info"):
        security.check_url("http://u@example.com/x.png", on)


def test_ipv6_forms_of_refused_ipv4_are_refused():
    policy = security.MediaPolicy(fetch=True, allow_nets=(security.ipaddress.ip_network("127.0.0.2/32"),))
    for address in (
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:7f00:1",  # IPv4-translated (::ffff:0:0:0/96)
        "::ffff:127.0.0.1",  # IPv4-mapped
        "64:ff9b::7f00:1",  # NAT64 to loopback
        "64:ff9b::a9fe:a9fe",  # NAT64 to 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "2001:0:808:808:8000:63bf:f7f7:f7f7",  # Teredo
    ):
        assert not policy.address_allowed(address), address
    for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "::ffff:127.0.0.2", "8.8.8.8"):
        assert policy.address_allowed(address), address


def test_pinned_connection_refuses_the_address_it_connects_to(monkeypatch):
    """The check runs on the socket aiohttp connects, not on a separate DNS lookup or URL parse."""
    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")

    async def fetch(policy: security.MediaPolicy, url: str) -> bytes:
        connection = security.pinned_connection(policy)
        try:
            return await connection.async_get_bytes(url, timeout=5)
        finally:
            await (await connection.get_async_client()).close()

    with Canary({"/x.png": SMALL}, host="127.0.0.1") as canary:
        with pytest.raises(aiohttp.ClientConnectorError):  # the canary listens: only the pin refuses
            asyncio.run(fetch(security.MediaPolicy(fetch=True), f"{canary.url}/x.png"))
        assert canary.hits == []
        allow = security.MediaPolicy(fetch=True, allow_nets=(security.ipaddress.ip_network("127.0.0.1/32"),))
        assert asyncio.run(fetch(allow, f"{canary.url}/x.png")) == SMALL
        assert canary.hits == ["/x.png"]


@pytest.mark.server
def test_parser_confusion_reaches_nothing_on_any_media_route(served):
    refused_port = served.refused.url.rsplit(":", 1)[1]
    allowed = served.allowed.url.removeprefix("http://")
    # control: an allowed address is fetched, so the refusals below are not a broken fetch
    reply = _post(served.url, "/v1/chat/completions", _chat(f"{served.allowed.url}/x.png", max_tokens=1))
    assert reply.status_code == 200, reply.text[:1000]
    assert served.allowed.hits == ["/x.png"]
    tricks = [
        f"http://127.0.0.1:{refused_port}\\@{allowed}/x.png",
        f"http://127.0.0.1:{refused_port}\\\\@{allowed}/x.png",
        f"http://user@{allowed}/x.png",
    ]
    for path, body in MEDIA_ROUTES.items():
        for url in tricks:
            reply = _post(served.url, path, body(url))
            assert served.refused.hits == [], (path, url, reply.status_code, served.refused.hits)
            _error(reply, 400, "not accepted")
    assert served.allowed.hits == ["/x.png"]


# ---------------------------------------------------------------- 3. metrics key, every method


@pytest.mark.server
def test_metrics_key_holds_for_every_method(served):
    for method in ("GET", "OPTIONS", "HEAD", "POST"):
        reply = requests.request(method, f"{served.url}/metrics", timeout=30)
        assert reply.status_code == 401, (method, reply.status_code, reply.text[:300])
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    reply = requests.options(f"{served.url}/metrics", headers=preflight, timeout=30)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == ORIGIN
    assert "halluguard_" not in reply.text and "# HELP" not in reply.text
    # an Origin alone is no preflight
    assert (
        requests.options(f"{served.url}/metrics", headers={"Origin": ORIGIN}, timeout=30).status_code == 401
    )
    assert requests.get(f"{served.url}/metrics", headers=AUTH, timeout=30).status_code == 200


# ------------------------------------------------------------------- 4. no 5xx from client input


def _raw(body: str) -> bytes:
    """A JSON body as bytes with a literal ``\\ud800`` escape (a lone surrogate once parsed)."""
    return body.replace("LONE", "\\ud800").encode()


@pytest.mark.server
def test_lone_surrogates_are_400(served):
    cases = [
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
         '"max_tokens": 2, "stop": ["LONE"]}'),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 2, "stop": "LONE"}'),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 2, "bad_words": ["aLONE"]}'),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 2, "request_id": "LONE"}'),
        ("/v1/messages", '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], '
         '"stop_sequences": ["LONE"]}'),
        ("/tokenize", '{"model": "%s", "prompt": "LONE"}'),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 2, "LONE": 1}'),
    ]  # fmt: skip
    for path, body in cases:
        _error(_post(served.url, path, data=_raw(body % MODEL)), 400, "lone UTF-16 surrogate")
    # a surrogate pair is a character: accepted
    reply = _post(
        served.url, "/tokenize", data=b'{"model": "%s", "prompt": "\\ud83d\\ude00"}' % MODEL.encode()
    )
    assert reply.status_code == 200, reply.text[:500]


def _upgrade(base: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = sock.recv(65536)
    return int(reply.split(b" ", 2)[1]), reply


@pytest.mark.server
def test_websocket_on_http_routes_and_unserved_routes(served):
    start = served.offset()
    for path in ("/metrics", "/v1/chat/completions", "/health", "/nowhere"):
        status, reply = _upgrade(served.url, path, AUTH)
        assert status == 403, (path, reply[:300])
    status, _ = _upgrade(served.url, "/metrics", {})
    assert status == 403
    log = served.log_since(start)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    _error(_post(served.url, "/v1/systemone", {"model": MODEL}), 404, "not served")


# ------------------------------------------------------------------------ 5. logs a client floods


@pytest.mark.server
def test_client_input_does_not_flood_the_log(served):
    start = served.offset()
    huge_int = b'{"model": "%s", "prompt": "hi", "max_tokens": 1%s}' % (MODEL.encode(), b"0" * 5000)
    _error(_post(served.url, "/v1/completions", data=huge_int), 400, "invalid JSON body")
    _error(_post(served.url, "/v1/chat/completions", data=b'{"n": %s}' % (b"7" * 5000)), 400, "JSON")
    _error(_post(served.url, "/v1/completions", {"model": "m" * 10_000_000, "prompt": "hi"}), 400, "'model'")
    _error(_post(served.url, "/tokenize", {"model": "m" * 100_000, "prompt": "hi"}), 400, "'model'")
    lone_image = DATA_URL[:40] + "\\ud800" + DATA_URL[40:]
    body = json.dumps(_chat()).replace(DATA_URL, lone_image).encode()
    _error(_post(served.url, "/v1/chat/completions", data=body), 400)
    for path, payload in (("/v1/messages", _messages(None)), ("/v1/responses", _responses(None))):
        for method in ("prunehal", "scr", ["farsight", "scr"]):
            _error(_post(served.url, path, {**payload, "mitigation": method}), 400, "needs an image")
    assert (
        json.loads(_post(served.url, "/v1/messages", _messages(None)).headers[HEADER])["method"] == "farsight"
    )
    log = served.log_since(start)
    assert len(log) < 50_000, len(log)
    assert "Traceback" not in log and "Logging error" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if " ERROR " in line or line.startswith("ERROR")], log[
        -3000:
    ]


def test_log_values_are_escaped():
    assert security.loggable("a\ud800b\nINFO forged") == "a\\ud800b\\nINFO forged"
    assert len(security.loggable("x" * 10_000, 50)) < 70


# ------------------------------------------------------------------------------------ 6. smaller


@pytest.mark.server
def test_forced_mitigation_refuses_unmitigated_model_routes(served):
    for path, body in (
        ("/generative_scoring", {"model": MODEL, "query": "a", "items": ["b"], "label_token_ids": [1, 2]}),
        (
            "/inference/v1/generate",
            {"model": MODEL, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 1}},
        ),
    ):
        _error(_post(served.url, path, body), 400, "requires a mitigation")


@pytest.mark.server
def test_echo_and_layer_ranges_bounded(served):
    for layers in (list(range(4, 1000)), [-1] * 900, "0:3000000", "0:" + "9" * 400):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1,
                "mitigation": {"method": "kvsmooth", "layers": layers}}  # fmt: skip
        error = _error(_post(served.url, "/v1/completions", body), 400)
        assert len(error["message"]) < 500, (len(error["message"]), error["message"][:300])
    assert "at most 1024" in error["message"]


@pytest.mark.server
def test_beam_search_read_as_vllm_reads_it(served):
    for value in ("false", "0", 0, "off", False):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "use_beam_search": value}
        reply = _post(served.url, "/v1/completions", {**body, "mitigation": "kvsmooth"})
        assert reply.status_code == 200, (value, reply.text[:500])
    for value in ("true", "1", 1, True):
        body = {
            "model": MODEL,
            "prompt": "hi",
            "max_tokens": 1,
            "use_beam_search": value,
            "mitigation": "kvsmooth",
        }
        _error(_post(served.url, "/v1/completions", body), 400, "beam search")


@pytest.mark.server
def test_header_and_counter_only_for_accepted_requests(served):
    key = 'halluguard_requests_total{method="kvsmooth"}'
    before = _metrics(served.url).get(key, 0.0)
    refused = {"model": MODEL, "prompt": "hi", "max_tokens": -1, "mitigation": "kvsmooth"}  # vLLM's 400
    reply = _post(served.url, "/v1/completions", refused)
    assert 400 <= reply.status_code < 500 and HEADER not in reply.headers, (reply.status_code, reply.headers)
    unknown = {"model": "no-such-model", "prompt": "hi", "max_tokens": 1, "mitigation": "kvsmooth"}
    reply = _post(served.url, "/v1/completions", unknown)
    assert reply.status_code == 404 and HEADER not in reply.headers
    assert _metrics(served.url).get(key, 0.0) == before
    reply = _post(served.url, "/v1/completions", {**refused, "max_tokens": 1})
    assert reply.status_code == 200 and json.loads(reply.headers[HEADER])["method"] == "kvsmooth"
    assert _metrics(served.url).get(key, 0.0) == before + 1


@pytest.mark.server
def test_image_byte_limit_on_every_media_route(served):
    assert len(SMALL) < MAX_IMAGE_BYTES < len(NOISY)
    for path, body in MEDIA_ROUTES.items():
        _error(_post(served.url, path, body(NOISY_URL)), 400, "--max-image-bytes")
        reply = _post(served.url, path, body(DATA_URL))
        assert reply.status_code == 200, (path, reply.text[:500])


def _raw_request(base: str, head: list[str], body: bytes, timeout: float = 20) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join([*head, f"Host: {host}:{port}", f"Authorization: Bearer {API_KEY}"])
                      + "\r\n\r\n").encode() + body)  # fmt: skip
        return sock.recv(65536)


@pytest.mark.server
def test_bodies_capped_whatever_their_type(served):
    for content_type in ("text/plain", "multipart/form-data; boundary=x", "application/json"):
        head = [
            "POST /v1/chat/completions HTTP/1.1",
            f"Content-Type: {content_type}",
            "Content-Length: 70000000",
        ]
        reply = _raw_request(served.url, head, b"x" * 1000)
        assert reply.startswith(b"HTTP/1.1 413"), (content_type, reply[:300])


# ------------------------------------------------------------------------- 7. reclaim over HTTP


@pytest.mark.server
def test_prunehal_reclaim_frees_blocks_over_http(served):
    key = "halluguard_prunehal_freed_blocks"
    before = _metrics(served.url).get(key, 0.0)
    for _ in range(2):
        reply = _post(served.url, "/v1/chat/completions", _chat(max_tokens=8, mitigation=RECLAIM_ALL))
        assert reply.status_code == 200, reply.text[:1000]
        assert json.loads(reply.headers[HEADER])["selection"] == "shared"
    after = _metrics(served.url).get(key, 0.0)
    assert after >= before + 2, (before, after)


def test_chunked_bodies_of_any_type_are_cut_at_the_cap(monkeypatch):
    """A body without Content-Length: past the cap the app is told the client left."""
    from vllm_halluguard.server import middleware

    monkeypatch.setattr(middleware, "MAX_BODY", 1000)
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    async def run(chunks: int) -> None:
        queue = [
            {"type": "http.request", "body": b"x" * 400, "more_body": i + 1 < chunks} for i in range(chunks)
        ]

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/audio/transcriptions", "root_path": "",
                 "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}  # fmt: skip
        await middleware.MitigationMiddleware(app)(scope, receive, send)

    asyncio.run(run(2))
    assert seen == ["http.request", "http.request"]
    seen.clear()
    asyncio.run(run(5))
    assert seen == ["http.request", "http.request", "http.disconnect"]


def test_long_error_bodies_from_vllm_are_cut():
    """vLLM quotes some request values in full; the middleware cuts error bodies over 16 KiB (the HTTP
    probe of ``tests/test_server_security.py`` now meets the ``model`` cap first)."""
    from vllm_halluguard.server.middleware import MAX_ERROR_BODY, _shorten_error

    body = json.dumps({"error": {"message": "The model `" + "m" * 50_000 + "` does not exist.", "code": 404}})
    short = json.loads(_shorten_error(body.encode()))
    assert short["error"]["message"].endswith("...(cut)") and len(short["error"]["message"]) < 1100
    assert short["error"]["code"] == 404
    assert _shorten_error(b"x" * 20_000) == b"x" * MAX_ERROR_BODY
    assert _shorten_error(b'{"a": "b"}') == b'{"a": "b"}'


def test_part_types_of_any_json_type_are_no_crash():
    """A part's ``type`` is whatever JSON the client sent: a list or an object there is no image and no
    media part (it used to raise ``TypeError`` from a set lookup, an unhandled error in the middleware)."""
    from vllm_halluguard.server.inputs import any_image, inline_images

    body = {"messages": [{"role": "assistant", "content": [{"type": ["image_url"]}, {"type": {"a": 1}}]}]}
    assert any_image(body) is False and list(inline_images(body)) == []
    security.check_media(body, security.MediaPolicy())  # nothing to refuse, nothing raised
    body["messages"][0]["content"].append(
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    )
    assert any_image(body) is True
    with pytest.raises(security.InputError, match=r"user messages only \(messages\[0\].content\[2\]\)"):
        security.check_media(body, security.MediaPolicy())
