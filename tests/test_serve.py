"""`make serve` for real: the OpenAI server on 127.0.0.1 answers an image chat from `openai`.

The server runs vLLM's normal multi-process layout (API server, engine core, worker); the plugin's
trace file proves that ``register()`` ran inside those processes, not in this test process.
"""

import os

import pytest
import requests
from openai import OpenAI

from helpers.images import data_url

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(plain_server):
    """The session's plain server: ``make serve`` with the plugin's trace file (conftest)."""
    return plain_server.url, plain_server.trace, plain_server.log


def test_chat_completion_with_base64_image(served):
    base, *_ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    content = [
        {"type": "image_url", "image_url": {"url": data_url(0)}},
        {"type": "text", "text": "Describe the image."},
    ]
    reply = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 64, "the 64 image tokens must be in the prompt"
    assert reply.choices[0].message.content


def test_plugin_registered_inside_server_processes(served):
    _, trace, log = served
    pids = {int(line.split()[0]) for line in trace.read_text().splitlines()}
    assert os.getpid() not in pids
    # API server, engine core and its worker each load the plugin once.
    assert len(pids) >= 3, trace.read_text()
    assert "vllm-halluguard plugin registered" in log.read_text()


def test_requests_without_the_field_are_plain_on_every_generation_route(served):
    """``make serve`` sets no default method: a body without the field runs unmitigated (the header says
    ``none``) on every generation route. (The keyed server's default is checked in test_server_security.)"""
    base, *_ = served
    image = {"type": "image_url", "image_url": {"url": data_url(0)}}
    content = [image, {"type": "text", "text": "Describe."}]
    chat = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    completion = {"model": "tiny-llava", "prompt": "hello there", "max_tokens": 2}
    responses = {"model": "tiny-llava", "input": "Say hello.", "max_output_tokens": 4}
    text = [{"role": "user", "content": "Say hello."}]
    messages = {"model": "tiny-llava", "max_tokens": 4, "messages": text}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion),
                       ("/invocations", completion), ("/v1/responses", responses),
                       ("/v1/messages", messages)):  # fmt: skip
        reply = requests.post(f"{base}{path}", json=body, timeout=120)
        assert reply.status_code < 500, (path, reply.text[:500])
        assert reply.headers["x-halluguard-mitigation"] == "none", path
