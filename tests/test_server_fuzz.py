"""Bad input never hurts the server: schemathesis fuzzing, oversized images, image-only methods on text.

One ``halluguard-serve --fixture llava --api-server-count 2 --max-image-bytes 100000`` per module (vLLM's
multi-process layout with two API processes behind one port, the default ``--max-image-pixels``), shared
by every test. Clients are the real ``openai`` client, plain HTTP and schemathesis; a few pure unit tests
of :mod:`server.inputs` come first.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from openai import OpenAI
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from schemathesis.checks import not_a_server_error

from canary import Canary
from helpers.images import data_url, png
from helpers.method_cases import METHOD_CASES, image_methods
from helpers.server import free_port, running_server, server_command
from vllm_halluguard.server.inputs import DEFAULT_MAX_PIXELS, ImageLimits, InputError, has_image
from vllm_halluguard.server.middleware import mitigation_schema
from vllm_halluguard.server.mitigation import IMAGE_METHODS, MitigationError, require_image
from vllm_halluguard.tiny_models import make_image

pytestmark = pytest.mark.server
logger = logging.getLogger(__name__)

MODEL = "tiny-llava"
MAX_BYTES = 100_000
HEADER = "x-halluguard-mitigation"


SMALL = png(make_image(0))
#: One pixel more than 4096 x 4096 on each side; a solid colour, so only ~60 kB of PNG.
BIG = png(Image.new("RGB", (4097, 4097), (200, 30, 30)))
#: 300 x 300 of noise: few pixels, but ~270 kB, over ``--max-image-bytes``.
NOISY = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)))
CORRUPT = "data:image/png;base64,AAAAbm90IGFuIGltYWdl"
#: Media URLs that once gave a 5xx (non-base64 data:, file:) or that must not be fetched.
ODD_URLS = [
    "data:image/png,notbase64",
    "data:image/png;base64,!!!!",
    "data:,",
    "file:///etc/passwd",
    "http://127.0.0.1:1/x.png",
    "http://169.254.169.254/latest/meta-data/",
]


def _chat_body(url: str | None, mitigation: Any = ..., max_tokens: int = 4) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe the image."}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    return body if mitigation is ... else body | {"mitigation": mitigation}


# ------------------------------------------------------------------------------------ unit tests


def test_image_limits_read_headers_only_and_name_the_part():
    limits = ImageLimits(max_bytes=MAX_BYTES)
    assert limits.max_pixels == DEFAULT_MAX_PIXELS == 4096 * 4096
    exact = png(Image.new("RGB", (4096, 4096)))
    for ok in (SMALL, exact):
        limits.check(_chat_body(data_url(ok)))
    limits.check(_chat_body(CORRUPT))  # left to vLLM, which answers its own 400
    limits.check(_chat_body("http://127.0.0.1:1/x.png"))  # not an inline image: server.security's
    with pytest.raises(InputError, match=r"4097x4097 \(16785409 pixels\).*16777216 pixels") as e:
        limits.check(_chat_body(data_url(BIG)))
    assert (e.value.param, e.value.reason) == ("messages[0].content[0].image_url.url", "image_too_large")
    with pytest.raises(InputError, match=rf"is {len(NOISY)} bytes, .* limit of {MAX_BYTES} bytes"):
        limits.check(_chat_body(data_url(NOISY)))
    responses_style = {"messages": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}
    assert has_image(responses_style) and has_image(_chat_body(CORRUPT))
    assert not has_image(_chat_body(None)) and not has_image({"messages": "odd"})
    ImageLimits(max_pixels=0, max_bytes=0).check(_chat_body(data_url(BIG)))  # 0: no limit
    with pytest.raises(ValueError, match="max_bytes"):
        ImageLimits.from_env({"HALLUGUARD_MAX_IMAGE_BYTES": "-1"})


def test_image_methods_need_an_image_whoever_chose_them():
    assert image_methods() == IMAGE_METHODS  # tests/helpers/method_cases.py: needs_image
    for name in IMAGE_METHODS:
        require_image(name, True)
        require_image(name, None)  # unknown: not checked
        with pytest.raises(MitigationError, match=rf"'{name}' \(the server default\) .* needs an image") as e:
            require_image(name, False, " (the server default)")
        assert e.value.reason == "needs_image"
    for name in set(METHOD_CASES) - IMAGE_METHODS:
        require_image(name, False)


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    tmp = tmp_path_factory.mktemp("server_fuzz")
    prom = tmp / "prometheus"
    prom.mkdir()
    port, log = free_port(), tmp / "server.log"
    cmd = server_command(port, ["--api-server-count", "2", "--max-image-bytes", str(MAX_BYTES)])
    with running_server(cmd, port, log, {"PROMETHEUS_MULTIPROC_DIR": str(prom)}) as url:
        yield url, log, prom


@pytest.fixture(scope="module")
def base(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(base) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _ok_chat(client: OpenAI, mitigation: Any = "none") -> str:
    """A well-formed image chat: its echoed mitigation header (asserts a full answer)."""
    body = _chat_body(data_url(SMALL), mitigation)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=body["messages"], max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True, "mitigation": mitigation},
    )  # fmt: skip
    reply = raw.parse()
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    return raw.headers[HEADER]


def _error(reply: requests.Response, status: int = 400) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert error["code"] == status and error["message"], error
    return error


def test_oversized_images_are_openai_400s_while_a_normal_image_succeeds(base, client):
    with Canary({"/big.png": BIG, "/small.png": SMALL}) as host, ThreadPoolExecutor(8) as pool:

        def post(body: dict[str, Any]) -> requests.Response:
            return requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)

        normal = [pool.submit(_ok_chat, client, m) for m in ("none", "kvsmooth", "prunehal")]
        big = pool.submit(post, _chat_body(data_url(BIG), "kvsmooth"))
        noisy = pool.submit(post, _chat_body(data_url(NOISY)))
        fetched_big = pool.submit(post, _chat_body(f"{host.url}/big.png"))
        fetched_small = pool.submit(post, _chat_body(f"{host.url}/small.png"))

        def with_openai() -> None:
            messages = _chat_body(data_url(BIG))["messages"]
            with pytest.raises(openai.BadRequestError, match="over this server's limit") as e:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            assert e.value.status_code == 400

        openai_case = pool.submit(with_openai)

        error = _error(big.result())
        assert error["param"] == "messages[0].content[0].image_url.url"
        assert "4097x4097" in error["message"] and "--max-image-pixels" in error["message"], error
        error = _error(noisy.result())
        assert error["param"] == "messages[0].content[0].image_url.url"
        assert f"{len(NOISY)} bytes" in error["message"] and "--max-image-bytes" in error["message"]
        # Fetching is off by default: image URLs are a 400 and the host never hears from the server.
        for fetched in (fetched_big, fetched_small):
            error = _error(fetched.result())
            assert "not fetched by this server" in error["message"], error
            assert error["param"] == "messages[0].content[0].image_url.url", error
        assert host.hits == [], "nothing may be fetched while fetching is off"
        openai_case.result()
        assert [json.loads(h)["method"] if h != "none" else h for h in (f.result() for f in normal)] == [
            "none",
            "kvsmooth",
            "prunehal",
        ]
    assert _ok_chat(client) == "none"


def test_a_method_that_needs_an_image_on_a_text_only_request_is_a_400(base, client):
    text_only = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

    def post(path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{base}{path}", json=body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(_ok_chat, client, "prunehal") for _ in range(2)]
        chat = pool.submit(post, "/v1/chat/completions", text_only | {"mitigation": "prunehal"})
        stream = pool.submit(
            post, "/v1/chat/completions", text_only | {"mitigation": "prunehal", "stream": True}
        )
        xargs = pool.submit(
            post, "/v1/chat/completions", text_only | {"vllm_xargs": {"halluguard": "prunehal"}}
        )
        completion = pool.submit(
            post,
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "max_tokens": 2, "mitigation": "prunehal"},
        )
        scr = [
            pool.submit(post, "/v1/chat/completions", text_only | {"mitigation": "scr"}),
            pool.submit(post, "/v1/completions", {"model": MODEL, "prompt": "hi", "mitigation": "scr"}),
        ]
        plain = pool.submit(post, "/v1/chat/completions", text_only | {"mitigation": "kvsmooth"})
        for future in (chat, stream, xargs, completion):
            error = _error(future.result())
            assert error["param"] == "mitigation", error
            assert "'prunehal'" in error["message"] and "needs an image" in error["message"], error
        for future in scr:
            _error(future.result())
        assert plain.result().status_code == 200, plain.result().text
        assert all(json.loads(f.result())["method"] == "prunehal" for f in good)
    with pytest.raises(openai.BadRequestError, match="needs an image"):
        client.chat.completions.create(
            model=MODEL, messages=text_only["messages"], max_tokens=2, extra_body={"mitigation": "prunehal"}
        )
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert json.loads(_ok_chat(client, "prunehal"))["method"] == "prunehal"


def _per_process(prom: Path, sample: str, labels: dict[str, str]) -> dict[int, float]:
    """Value of one sample in each process's own prometheus multiprocess files."""
    values = {}
    for pid in {int(p.stem.rsplit("_", 1)[1]) for p in prom.glob("*.db")}:
        one = prom.parent / f"prom_{pid}"
        shutil.rmtree(one, ignore_errors=True)
        one.mkdir()
        for f in prom.glob(f"*_{pid}.db"):
            shutil.copy(f, one)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))
        if (value := registry.get_sample_value(sample, labels)) is not None:
            values[pid] = value
    return values


def _metric(base: str, key: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_api_processes_serve_the_field_the_endpoint_and_shared_metrics(served):
    base, log, prom = served
    assert log.read_text().count("halluguard: mitigation field enabled") == 2, "one middleware per process"
    key = 'halluguard_requests_total{method="farsight"}'
    before, by_pid_before = (
        _metric(base, key),
        _per_process(prom, "halluguard_requests_total", {"method": "farsight"}),
    )

    def one(_: int) -> None:  # a new connection each
        reply = requests.post(
            f"{base}/v1/completions",
            json={
                "model": MODEL,
                "prompt": "hi",
                "max_tokens": 2,
                "mitigation": {"method": "farsight", "mode": "C"},
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.headers[HEADER])["mode"] == "C"
        mitigations = requests.get(f"{base}/v1/mitigations", timeout=10)
        assert mitigations.status_code == 200 and mitigations.json()["num_layers"] == 4

    # Both processes accept on the one listening socket, and the kernel hands a connection to whichever
    # waits first: sequential requests on a busy machine can all land on one. Rounds of concurrent
    # requests (at most 8 rounds) until both have served some.
    n, moved = 0, {}
    with ThreadPoolExecutor(8) as pool:
        while len(moved) < 2 and n < 64:
            list(pool.map(one, range(8)))
            n += 8
            by_pid = _per_process(prom, "halluguard_requests_total", {"method": "farsight"})
            moved = {
                pid: v - by_pid_before.get(pid, 0.0)
                for pid, v in by_pid.items()
                if v > by_pid_before.get(pid, 0.0)
            }
    assert len(moved) == 2 and sum(moved.values()) == n, f"requests by API process: {moved}"
    assert _metric(base, key) - before == n, "/metrics of any process sums over both"


def _parameter_schema(mitigations: dict[str, Any]) -> dict[str, Any]:
    """``mitigation`` as one method with all its parameters (``GET /v1/mitigations`` schemas), or a list."""
    per_method = [
        {
            "type": "object",
            "properties": {"method": {"enum": [row["method"]]}, **row["schema"]["properties"]},
            "required": ["method", *row["schema"]["properties"]],
            "additionalProperties": False,
        }
        for row in mitigations["data"]
    ]
    return {"anyOf": [*per_method, {"type": "array", "items": {"anyOf": per_method}, "maxItems": 2}]}


def _fuzz_document(mitigation: dict[str, Any]) -> dict[str, Any]:
    """A compact OpenAPI 3.1 document of our surface (the completion bodies kept small and realistic)."""
    urls = [data_url(SMALL), data_url(BIG), data_url(NOISY), CORRUPT, *ODD_URLS]
    part = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"type": {"enum": ["text"]}, "text": {"type": "string", "maxLength": 40}},
                "required": ["type", "text"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "type": {"enum": ["image_url"]},
                    "image_url": {
                        "type": "object",
                        "properties": {"url": {"enum": urls}},
                        "required": ["url"],
                    },
                },
                "required": ["type", "image_url"],
                "additionalProperties": False,
            },
        ]
    }
    message = {
        "type": "object",
        "properties": {
            "role": {"enum": ["user", "system"]},
            "content": {
                "anyOf": [
                    {"type": "string", "maxLength": 40},
                    {"type": "array", "items": part, "maxItems": 3},
                ]
            },
        },
        "required": ["role", "content"],
        "additionalProperties": False,
    }
    common = {
        "model": {"enum": [MODEL]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
        "stream": {"type": "boolean"},
        "mitigation": mitigation,
        "vllm_xargs": {
            "type": "object",
            "properties": {"halluguard": {"enum": ["kvsmooth", "prunehal", "farsight", "bogus", "{bad"]}},
        },
    }

    def post(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": common | properties,
            "required": ["model", "mitigation", *required],  # requests without it: test_server_api
            "additionalProperties": False,
        }
        return {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "completion"}, "400": {"description": "bad request"}},
        }

    chat = {"messages": {"type": "array", "items": message, "minItems": 1, "maxItems": 2}}
    completion = {"prompt": {"type": "string", "maxLength": 40}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "halluguard surface", "version": "1"},
        "paths": {
            "/v1/mitigations": {"get": {"responses": {"200": {"description": "methods"}}}},
            "/v1/chat/completions": {"post": post(chat, ["messages"])},
            "/v1/completions": {"post": post(completion, ["prompt"])},
        },
    }


def test_openapi_documents_the_field_and_schemathesis_finds_no_5xx(base, client):
    openapi_doc = requests.get(f"{base}/openapi.json", timeout=60).json()
    documented = openapi_doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["mitigation"]
    assert documented == mitigation_schema()
    assert openapi_doc["components"]["schemas"]["CompletionRequest"]["properties"]["mitigation"] == documented
    assert "/v1/mitigations" in openapi_doc["paths"]
    with_parameters = _parameter_schema(requests.get(f"{base}/v1/mitigations", timeout=10).json())
    statuses: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    def fuzz(mitigation: dict[str, Any], mode: schemathesis.GenerationMode, examples: int) -> None:
        schema = schemathesis.openapi.from_dict(_fuzz_document(mitigation))

        @settings(
            max_examples=examples, derandomize=True, database=None, deadline=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=schema.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=base, session=session, timeout=120)
            statuses[(case.path, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error])

        run()

    fuzz(documented, schemathesis.GenerationMode.POSITIVE, 30)
    fuzz(with_parameters, schemathesis.GenerationMode.POSITIVE, 40)
    fuzz(documented, schemathesis.GenerationMode.NEGATIVE, 30)
    # Deep nesting (Python's json recursion limit is ~1000) and non-finite numbers: 400, never 5xx.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/mitigations", "/tokenize"):
        for raw in (b"[" * 1000 + b"]" * 1000, b'{"a":' * 500 + b"1" + b"}" * 500, b'{"model": NaN}'):
            reply = session.post(f"{base}{path}", data=raw, headers={"Content-Type": "application/json"})
            statuses[(path, reply.status_code)] += 1
            assert reply.status_code in (400, 405), (path, reply.status_code, reply.text[:300])
    logger.info("schemathesis cases by (path, status): %s", dict(statuses))
    paths = {path for path, _ in statuses}
    codes = {code for _, code in statuses}
    assert {"/v1/chat/completions", "/v1/completions"} <= paths, statuses
    assert {200, 400} <= codes, statuses
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert _ok_chat(client, "kvsmooth")
