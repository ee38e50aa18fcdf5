"""The docs run: every fenced block of README.md and docs/*.md is run here or says why it cannot be.

A block is marked by the line(s) right above its fence: an HTML comment
``<!-- doc-test: tests/test_docs.py::test_name -->`` (that test takes the block's text from the
markdown file through :func:`doc_blocks` and runs or checks it, so an edited doc is what is tested)
or a visible italic line ``*Not run by the tests: <reason>.*``. The server tests use the suite's
shared ``make serve`` server; the documented ``127.0.0.1:8000`` is replaced by its address.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

import vllm_halluguard
from helpers.server import TINY_CPU_ARGS
from vllm_halluguard.methods import parse

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_URL = "http://127.0.0.1:8000"
DOC_TEST = re.compile(r"^<!-- doc-test: tests/test_docs\.py::(\w+) -->$")
NOT_RUN = re.compile(r"^\*Not run by the tests: .+\*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")


@dataclass
class Block:
    """One fenced block: where it is, its language tag, its text and the markers above it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    tests: list[str] = field(default_factory=list)
    not_run: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with the markers on the lines above each opening fence."""
    lines = path.read_text(encoding="utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        close = i + 1
        while close < len(lines) and lines[close].strip() != m.group(1):
            close += 1
        block = Block(path, i + 1, m.group(2).strip(), "\n".join(lines[i + 1 : close]) + "\n")
        above = i - 1
        while above >= 0 and (lines[above].strip() == "" or _marker(lines[above].strip(), block)):
            above -= 1
        found.append(block)
        i = close + 1
    return found


def _marker(line: str, block: Block) -> bool:
    """Record ``line`` on ``block`` if it is a marker; whether it was one."""
    if m := DOC_TEST.match(line):
        block.tests.append(m.group(1))
        return True
    if NOT_RUN.match(line):
        block.not_run = True
        return True
    return False


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in blocks(path)]


def doc_blocks(test: str) -> list[Block]:
    """The blocks whose marker names ``test`` (at least one, else the doc lost its marker)."""
    found = [b for b in all_blocks() if test in b.tests]
    assert found, (
        f"no block in README.md or docs/*.md is marked <!-- doc-test: tests/test_docs.py::{test} -->"
    )
    return found


def one_block(test: str) -> Block:
    (block,) = doc_blocks(test)
    return block


def run_python(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Execute a documented Python block in this process with ``cwd`` as working directory; its stdout."""
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__main__"})
    return out.getvalue()


def run_shell(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a documented shell block with bash in the repository root, the venv's scripts first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def on_server(text: str, url: str) -> str:
    """``text`` with the documented server address replaced by ``url`` (which must occur in it)."""
    assert DOC_URL in text, f"the block no longer talks to {DOC_URL}"
    return text.replace(DOC_URL, url)


def write_photo(folder: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "photo.png")


# ---------------------------------------------------------------------------------------------------
# The markers themselves (no engine, no server)


def test_every_fenced_block_is_run_or_says_why_not():
    unmarked = [b.where for b in all_blocks() if not b.tests and not b.not_run]
    assert not unmarked, (
        "fenced blocks with neither <!-- doc-test: tests/test_docs.py::NAME --> nor "
        f"'*Not run by the tests: <reason>.*' right above them: {unmarked}"
    )


def test_doc_test_markers_name_tests_of_this_module():
    names = {n for n, obj in globals().items() if n.startswith("test_") and callable(obj)}
    missing = [f"{b.where} -> {t}" for b in all_blocks() for t in b.tests if t not in names]
    assert not missing, f"doc-test markers that name no test in tests/test_docs.py: {missing}"
    for name in {t for b in all_blocks() for t in b.tests}:
        assert f'block("{name}")' in inspect.getsource(
            globals()[name]
        ) or f'blocks("{name}")' in inspect.getsource(globals()[name]), (
            f"{name} does not take its documented block through one_block/doc_blocks"
        )


def test_marker_parser_sees_unmarked_and_marked_fences(tmp_path):
    """The checker itself: a fence without a marker is reported, both marker kinds are read."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```bash\nls\n```\n\n*Not run by the tests: needs a GPU node.*\n\n```bash\nnvidia-smi\n```\n"
        "<!-- doc-test: tests/test_docs.py::test_x -->\n```python\nprint(1)\n```\n"
    )
    got = [(b.line, b.lang, b.tests, b.not_run) for b in blocks(page)]
    assert got == [(3, "bash", [], False), (9, "bash", [], True), (13, "python", ["test_x"], False)]


# ---------------------------------------------------------------------------------------------------
# Blocks that need only the virtual environment


def test_readme_activate():
    """README's ``source .venv/bin/activate`` puts this checkout's venv first on PATH."""
    block = one_block("test_readme_activate")
    done = run_shell(block.text + "command -v python\ncommand -v halluguard-serve\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ROOT / ".venv/bin/python"), str(ROOT / ".venv/bin/halluguard-serve")]


def test_readme_cli_version_and_help():
    """README's version and help commands work; the documented version line is the one printed."""
    block = one_block("test_readme_cli_version_and_help")
    done = run_shell(block.text)
    assert done.returncode == 0, done.stderr
    shown = re.search(r"--version\s+# prints e\.g\. (.+)", block.text)
    assert shown, "the block no longer shows what --version prints"
    first = done.stdout.splitlines()[0]
    assert first.split()[:2] == shown.group(1).split()[:2] == ["vllm-halluguard", vllm_halluguard.__version__]
    assert first.startswith("vllm-halluguard") and "(vLLM 0.32" in first
    for tool in re.findall(r"^(halluguard-\w+) --help", block.text, flags=re.M):
        assert f"usage: {tool}" in done.stdout


def test_readme_cpu_flags():
    """README's CPU ``halluguard-serve`` line carries ``make serve``'s settings (which the suite starts)."""
    words = shlex.split(one_block("test_readme_cpu_flags").text.replace("\\\n", " "))
    assert words[0] == "halluguard-serve"
    needed = [a for a in TINY_CPU_ARGS]
    i = needed.index("--max-num-seqs")  # a throughput setting, not needed to start
    del needed[i : i + 2]
    for i, word in enumerate(needed):
        if not word.startswith("--"):
            continue
        assert word in words, f"README's CPU command lacks {word}"
        value = needed[i + 1] if i + 1 < len(needed) and not needed[i + 1].startswith("--") else None
        if value is not None:
            assert words[words.index(word) + 1] == value, (
                f"README's CPU command: {word} differs from make serve"
            )


def test_architecture_source_layout():
    """Every path in architecture.md's source tree exists."""
    block = one_block("test_architecture_source_layout")
    top, paths = None, []
    for line in block.text.splitlines():
        m = re.match(r"^( {0,2})(\S+)", line)
        if m is None:
            continue
        if m.group(1) == "":
            top = m.group(2)
            paths.append(top)
        elif top is not None:
            paths.append(top + m.group(2))
    assert len(paths) > 15
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_readme_architecture_diagram():
    """Every file and folder README's diagram names exists (``x/a.py, b.py``: ``b.py`` is in ``x/``; a route
    such as ``/v1/chat`` is not a path)."""
    text = one_block("test_readme_architecture_diagram").text
    paths = []
    for line in text.splitlines():
        for m in re.finditer(r"(?<![/\w])((?:[\w.]+/)+)([\w.]*)((?:, \w+\.py)*)", line):
            folder, name, more = m.group(1), m.group(2), m.group(3)
            paths.append(folder + name)
            paths += [folder + extra.strip() for extra in more.split(",") if extra.strip()]
    assert len(paths) > 12, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README.md's diagram names paths that do not exist: {missing}"


def test_prunehal_blocks_config():
    """The reclaiming PruneHal variant in prunehal-blocks.md parses to exactly those settings."""
    spec = json.loads(one_block("test_prunehal_blocks_config").text)
    cfg = parse(spec)
    assert cfg is not None
    assert {k: getattr(cfg, k) for k in spec if k != "method"} == {
        k: v for k, v in spec.items() if k != "method"
    }
    assert cfg.name == spec["method"]


def test_benchmarks_cost_model():
    """benchmarks.md's cost-model command prints exactly the table the page shows after it."""
    block = one_block("test_benchmarks_cost_model")
    done = run_shell(block.text)
    assert done.returncode == 0, done.stderr
    after = block.path.read_text(encoding="utf-8").split("\n")[block.line + block.text.count("\n") :]
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    end = next(i for i in range(start, len(after)) if not after[i].startswith("|"))
    printed = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert printed == after[start:end]


def test_methods_hf_reference(tmp_path, monkeypatch):
    """methods.md's HF-reference example generates two captions with KVSmooth attached."""
    out = run_python(one_block("test_methods_hf_reference").text, tmp_path, monkeypatch)
    captions = eval(out)  # the documented block prints a list of strings
    assert isinstance(captions, list) and len(captions) == 2
    assert all(isinstance(c, str) and c for c in captions)


# ---------------------------------------------------------------------------------------------------
# Blocks that need the server: the suite's shared `make serve` server


@pytest.mark.server
def test_readme_api_example(plain_server, tmp_path, monkeypatch):
    write_photo(tmp_path)
    out = run_python(
        on_server(one_block("test_readme_api_example").text, plain_server.url), tmp_path, monkeypatch
    )
    assert out.strip(), "the README example printed no reply"


@pytest.mark.server
def test_api_choosing_a_method(plain_server, tmp_path, monkeypatch):
    """api.md's client example runs; the header it prints matches the one documented in its comment."""
    block = one_block("test_api_choosing_a_method")
    shown = re.search(r'print\(raw\.headers\["x-halluguard-mitigation"\]\)\s+# (.+)', block.text)
    assert shown, "the block no longer documents the header it prints"
    write_photo(tmp_path)
    out = run_python(on_server(block.text, plain_server.url), tmp_path, monkeypatch)
    pattern = ".*".join(map(re.escape, shown.group(1).split("...")))
    assert re.search(f"{pattern}\n$", out), f"printed {out[-300:]!r}, documented {shown.group(1)!r}"


@pytest.mark.server
def test_api_curl(plain_server):
    """api.md's curl line: a 200 whose header echoes the requested KVSmooth window."""
    done = run_shell(on_server(one_block("test_api_curl").text, plain_server.url))
    assert done.returncode == 0, done.stderr
    head = done.stdout.split("\r\n\r\n")[0].lower()
    assert head.startswith("http/1.1 200")
    header = re.search(r"^x-halluguard-mitigation: (.+)$", head, flags=re.M)
    assert header and json.loads(header.group(1))["window"] == 8


@pytest.mark.server
def test_api_error_shape(plain_server):
    """api.md's documented 400 for ``"bogus"`` is what the server answers."""
    documented = json.loads(one_block("test_api_error_shape").text)
    reply = requests.post(
        f"{plain_server.url}/v1/completions",
        json={"model": "tiny-llava", "prompt": "Hello", "max_tokens": 4, "mitigation": "bogus"},
        timeout=60,
    )
    assert reply.status_code == 400
    assert reply.json() == documented
