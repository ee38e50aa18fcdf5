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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from vllm_halluguard.plugin import TRACE_ENV

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


@dataclass(frozen=True)
class SharedServer:
    """A running shared server: its base URL, its log and the plugin trace file of its processes."""

    url: str
    log: Path
    trace: Path


def plain_command(port: int) -> list[str]:
    """``make serve`` on ``port``: the plain tiny server (the same arguments as :func:`server_command`)."""
    return ["make", "-s", "serve", f"PORT={port}"]


#: The shared server configurations (name -> command for a port). The plain one is started through
#: ``make serve`` so that the modules using it also prove ``make serve`` works.
SHARED_COMMANDS: dict[str, Callable[[int], list[str]]] = {"plain": plain_command}


class SharedServers:
    """Real servers shared by every test module that needs one configuration (one per session).

    A server starts on first use and stops when :meth:`stop` is called (``tests/conftest.py`` calls it
    once the next test belongs to another group of modules and does not use it), so servers do not
    pile up while the rest of the session runs; a later user starts it again.
    """

    def __init__(self, folder: Callable[[str], Path]) -> None:
        self._folder = folder
        self._running: dict[str, tuple[SharedServer, contextlib.ExitStack]] = {}

    def get(self, name: str) -> SharedServer:
        if name not in self._running:
            tmp = self._folder(f"server_{name}")
            port, log, trace = free_port(), tmp / "server.log", tmp / "trace"
            stack = contextlib.ExitStack()
            url = stack.enter_context(
                running_server(SHARED_COMMANDS[name](port), port, log, {TRACE_ENV: str(trace)})
            )
            self._running[name] = (SharedServer(url, log, trace), stack)
        return self._running[name][0]

    def running(self) -> list[str]:
        return list(self._running)

    def stop(self, name: str) -> None:
        entry = self._running.pop(name, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        for name in list(self._running):
            self.stop(name)
