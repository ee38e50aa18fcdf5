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
from vllm_halluguard.server.security import ROUTES_FILE_ENV

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300
#: Seconds between ``/health`` polls while a server starts (its readiness shows within this).
HEALTH_POLL_S = 0.2
#: ``vllm serve`` settings for the tiny fixtures on a small CPU (as ``make serve``).
TINY_CPU_ARGS = (
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "16",
    "--kv-cache-memory-bytes", "268435456", "--limit-mm-per-prompt", '{"image": 1}',
)  # fmt: skip


@dataclass(frozen=True)
class StartRecord:
    """One server start: its name (the log's folder), seconds to ``/health``, and the CPU seconds its
    processes had used by then with their number (from ``/proc``; a measure the machine's load barely
    moves, unlike the wall time)."""

    name: str
    wall_s: float
    cpu_s: float
    processes: int


#: Every server start of this process (tests/conftest.py prints them at the end of the session).
STARTS: list[StartRecord] = []


def session_cpu(session: int) -> tuple[float, int]:
    """CPU seconds (user + system) used so far by the live processes of ``session``, and how many there
    are (0, 0 where ``/proc`` is missing)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, count = 0.0, 0
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from the state on (the name may hold spaces)
        if int(fields[3]) == session:
            total += (int(fields[11]) + int(fields[12])) / tick
            count += 1
    return total, count


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
    start = time.monotonic()
    try:
        deadline = start + STARTUP_TIMEOUT_S
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
            time.sleep(HEALTH_POLL_S)
        wall = time.monotonic() - start
        STARTS.append(StartRecord(log.parent.name.rstrip("0123456789"), wall, *session_cpu(proc.pid)))
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
    """A running shared server: its base URL, its log, the plugin trace file of its processes and the
    route list its API process wrote (``routes``; only where its configuration asks for one)."""

    url: str
    log: Path
    trace: Path
    routes: Path


def plain_command(port: int) -> list[str]:
    """``make serve`` on ``port``: the plain tiny server (the same arguments as :func:`server_command`)."""
    return ["make", "-s", "serve", f"PORT={port}"]


#: The keyed server's settings, shared by ``tests/test_server_api.py`` (the ``mitigation`` field, the
#: listing, metrics) and ``tests/test_server_security.py`` (routes behind the key, media fetching): an
#: API key, an allow-list without ``prunehal`` (so "not allowed" is testable), a default method (so
#: "requests without the field get the server default" is testable; ``none`` stays allowed and is sent
#: explicitly where a test needs a plain request), and media fetching on for 127.0.0.1 only (canary
#: HTTP servers; "fetching off by default" is checked on the flag-less fuzz server).
KEYED_API_KEY = "hg-keyed-key"
KEYED_ALLOW = ("none", "kvsmooth", "farsight", "scr")
KEYED_DEFAULT = "kvsmooth"
KEYED_FETCH_TIMEOUT_S = 3
KEYED_FETCH_NET = "127.0.0.1/32"


def keyed_command(port: int) -> list[str]:
    """``halluguard-serve`` with the keyed server's settings (:data:`KEYED_API_KEY` and the rest)."""
    extra = [
        "--api-key", KEYED_API_KEY, "--mitigation-allow", ",".join(KEYED_ALLOW),
        "--default-mitigation", KEYED_DEFAULT, "--allow-media-fetch", "--media-fetch-allow-net",
        KEYED_FETCH_NET, "--media-fetch-timeout", str(KEYED_FETCH_TIMEOUT_S),
    ]  # fmt: skip
    return server_command(port, extra)


@dataclass(frozen=True)
class ServerConfig:
    """One shared server configuration: its command for a port, and whether its API process writes
    the list of mounted routes (``HALLUGUARD_ROUTES_FILE``) for the tests."""

    command: Callable[[int], list[str]]
    write_routes: bool = False


#: The shared server configurations. The plain one is started through ``make serve`` so that the
#: modules using it also prove ``make serve`` works; it runs with nothing added but the plugin trace.
SHARED_CONFIGS: dict[str, ServerConfig] = {
    "plain": ServerConfig(plain_command),
    "keyed": ServerConfig(keyed_command, write_routes=True),
}


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
            config = SHARED_CONFIGS[name]
            tmp = self._folder(f"server_{name}")
            port, log, trace, routes = free_port(), tmp / "server.log", tmp / "trace", tmp / "routes.json"
            env = {TRACE_ENV: str(trace)} | ({ROUTES_FILE_ENV: str(routes)} if config.write_routes else {})
            stack = contextlib.ExitStack()
            url = stack.enter_context(running_server(config.command(port), port, log, env))
            self._running[name] = (SharedServer(url, log, trace, routes), stack)
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
