"""`make serve` for real: the OpenAI server on 127.0.0.1 answers an image chat from `openai`.

The server runs vLLM's normal multi-process layout (API server, engine core, worker); the plugin's
trace file proves that ``register()`` ran inside those processes, not in this test process.
"""

import os

import pytest
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
