"""Start the real OpenAI server (``halluguard-serve``, as ``make serve`` does) for tests and tools.

The server runs in its own process group on a free loopback port with vLLM's normal multi-process
layout; :func:`running_server` waits for ``/health`` and stops the whole group on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300
#: ``vllm serve`` settings for the tiny fixtures on a small CPU (as ``make serve``).
TINY_CPU_ARGS = (
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "16",
    "--kv-cache-memory-bytes", "268435456", "--limit-mm-per-prompt", '{"image": 1}',
)  # fmt: skip


class ServerError(RuntimeError):
    """The server exited or did not become healthy; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, extra: Sequence[str] = (), fixture: str = "llava") -> list[str]:
    """``halluguard-serve`` on a tiny fixture at ``127.0.0.1:port`` with ``extra`` arguments."""
    return [sys.executable, "-m", "vllm_halluguard.server", "--fixture", fixture,
            "--host", "127.0.0.1", "--port", str(port), *TINY_CPU_ARGS, *extra]  # fmt: skip


@contextlib.contextmanager
def running_server(
    cmd: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``cmd`` (which serves on ``port``), yield its base URL once healthy, then stop it."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise ServerError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerError(
                    f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
