"""What ships: the wheel holds the product only, under one top-level module, with no import cycles.

The wheel is built for real (setuptools' PEP 517 backend, in a subprocess, from a copy of the tree)
and inspected; an interpreter without site-packages then imports from the unpacked wheel alone.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE = "vllm_halluguard"
#: Console scripts the docs name (README, docs/).
SCRIPTS = {
    "halluguard-serve",
    "halluguard-loadtest",
    "halluguard-eval",
    "halluguard-fixtures",
    "halluguard-check",
}


def source_dir(package: str) -> Path:
    """Folder of ``package`` in the repository: its import path (``server``/``loadtest`` through links)."""
    return ROOT / Path(*package.split("."))


def shipped_sources() -> dict[str, Path]:
    """Every ``.py`` file of the listed packages, by its path inside the wheel."""
    files = {}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        for f in source_dir(package).glob("*.py"):
            files["/".join([*package.split("."), f.name])] = f
    return files


# --- configuration ------------------------------------------------------------------------------------


def test_every_package_folder_is_listed():
    """A new subpackage not listed in pyproject.toml would silently be left out of the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    base = ROOT / PACKAGE
    found = {
        ".".join([PACKAGE, *Path(folder).relative_to(base).parts])
        for folder, _, names in os.walk(base, followlinks=True)  # into server/ and loadtest/
        if "__init__.py" in names
    }
    assert f"{PACKAGE}.server" in found and f"{PACKAGE}.loadtest" in found
    assert found == listed
    assert all(p == PACKAGE or p.startswith(PACKAGE + ".") for p in listed), "one top-level module only"
    assert "package-data" not in PYPROJECT["tool"]["setuptools"], "no data files ship (testbed weights)"


def test_console_scripts_point_at_shipped_functions():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == SCRIPTS
    sources = shipped_sources()
    for target in scripts.values():
        module, _, func = target.partition(":")
        path = "/".join(module.split(".")) + ".py"
        assert path in sources, target
        tree = ast.parse(sources[path].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), target


def test_test_extra_covers_what_the_tests_import():
    """``pip install -e ".[test]"`` then ``pytest``: every third-party module the tests import is there."""
    extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"]).lower()
    # Modules whose distribution has another name, or which come with vLLM itself.
    distribution = {"yaml": "pyyaml", "xdist": "pytest-xdist"}
    from_vllm = {"torch", "transformers", "vllm", "numpy", "PIL", "safetensors", "pydantic", "httpx"}
    from_vllm |= {"prometheus_client", "tokenizers", "triton"}
    local = {PACKAGE, "helpers", "testbed", "build_vllm_attention"}
    local |= {f.stem for f in (ROOT / "tests").glob("*.py")}  # test modules import each other's tables
    imported = set()
    for f in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - from_vllm - local
    assert third_party, "the scan found no third-party import at all"
    missing = {m for m in third_party if distribution.get(m, m).replace("_", "-") not in extra}
    assert not missing, f"not in the test extra: {sorted(missing)}"
    assert "pytest-xdist" in extra  # make test runs pytest -n 2


def test_cpu_lock_satisfies_the_test_extra():
    """The recipe's venv (requirements/cpu.lock) already has every test requirement, at a version the
    extra accepts: ``pip install -e ".[test]"`` there changes nothing."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = {}
    for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith((" ", "#")):
            locked[canonicalize_name(name)] = version.strip()
    for text in PYPROJECT["project"]["optional-dependencies"]["test"]:
        req = Requirement(text)
        version = locked.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in cpu.lock"
        assert req.specifier.contains(version, prereleases=True), f"{text} vs locked {version}"


# --- layout: server/ and loadtest/ are subpackages for every tool -----------------------------------


@pytest.mark.parametrize("name", ["server", "loadtest"])
def test_top_level_folder_is_linked_into_the_package(name):
    """``vllm_halluguard/<name>`` is a relative link to the top-level folder, so the checkout, an editable
    install, the wheel build, mypy and ruff all find it under its package name (no package-dir
    mapping, no ``__path__`` extension)."""
    link, folder = ROOT / PACKAGE / name, ROOT / name
    assert folder.is_dir() and not folder.is_symlink(), "the code lives in the top-level folder"
    assert link.is_symlink() and os.readlink(link) == f"../{name}"
    assert link.resolve() == folder
    assert "package-dir" not in PYPROJECT["tool"]["setuptools"]


def test_mypy_checks_server_and_loadtest_under_their_package_names():
    """mypy's sources (pyproject's config) hold each server/loadtest file once, as ``vllm_halluguard.*``:
    their imports of each other then resolve to typed modules instead of ``Any``."""
    from mypy.main import process_options

    sources, _ = process_options(["--config-file", str(ROOT / "pyproject.toml")])
    by_file = {Path(s.path or "").resolve(): s.module for s in sources}
    assert len(by_file) == len(sources), "a file checked twice under two names"
    for name in ("server", "loadtest"):
        files = sorted((ROOT / name).glob("*.py"))
        assert files
        for f in files:
            stem = "" if f.stem == "__init__" else f".{f.stem}"
            assert by_file.get(f) == f"{PACKAGE}.{name}{stem}", f
    assert not [m for m in by_file.values() if m.split(".")[0] in {"server", "loadtest"}]


@pytest.mark.parametrize("name", ["server", "loadtest"])
def test_ruff_sorts_the_package_imports_as_first_party(name):
    """In server/ and loadtest/, ``vllm_halluguard.<name>`` imports sort with the first-party block."""
    first_party = sorted([f"from {PACKAGE}.{name} import cli\n", f"from {PACKAGE}.methods import cut\n"])
    probe = "import httpx\n\n" + "".join(first_party)
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "I", "--stdin-filename", f"{name}/probe.py", "-"],
        cwd=ROOT, input=probe, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


# --- the built wheel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tree (the checkout stays free of build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in (PACKAGE, "server", "loadtest", "tests"):
        # The links stay links (as in the Dockerfile's COPY): the build must follow them.
        shutil.copytree(ROOT / name, src / name, ignore=ignore, symlinks=True)
    out = tmp / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


def test_wheel_holds_the_product_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {PACKAGE, f"{PACKAGE}-0.1.0.dist-info"}, "no generic top-level module (server, loadtest)"
    files = [n for n in names if n.startswith(PACKAGE + "/")]
    # Every module of the three product folders, at its package path (independent of pyproject's list).
    folders = {PACKAGE: PACKAGE, "server": f"{PACKAGE}/server", "loadtest": f"{PACKAGE}/loadtest"}
    expected = {
        f"{inside}/{f.relative_to(ROOT / folder).as_posix()}"
        for folder, inside in folders.items()
        for f in (ROOT / folder).rglob("*.py")
    }
    assert set(files) == expected
    # (the parity harness is product code: halluguard-check runs it; tests/helpers/parity.py re-exports it)
    for unwanted in ("testbed", "helpers", "testing", ".safetensors", "triton_mode", "train"):
        assert not [n for n in files if unwanted in n], unwanted
    assert f"{PACKAGE}/server/cli.py" in files and f"{PACKAGE}/loadtest/cli.py" in files
    # The linked folders ship as files with their content (not as links).
    for folder in ("server", "loadtest"):
        for f in (ROOT / folder).glob("*.py"):
            assert zipfile.ZipFile(wheel).read(f"{PACKAGE}/{folder}/{f.name}") == f.read_bytes(), f


def test_wheel_entry_points(wheel):
    z = zipfile.ZipFile(wheel)
    parser = configparser.ConfigParser()
    parser.read_string(z.read(f"{PACKAGE}-0.1.0.dist-info/entry_points.txt").decode())
    assert set(parser["console_scripts"]) == SCRIPTS
    assert parser["console_scripts"]["halluguard-serve"] == "vllm_halluguard.server.cli:main"
    assert parser["vllm.general_plugins"]["halluguard"] == "vllm_halluguard.plugin:register"


def test_unpacked_wheel_has_no_generic_modules(wheel, tmp_path):
    """From the wheel alone (no site-packages, no checkout on the path): the namespaced names import
    and ``server`` / ``loadtest`` do not."""
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(tmp_path / 'site')!r}]\n"
        "import vllm_halluguard.server, vllm_halluguard.loadtest\n"
        "assert vllm_halluguard.server.__file__.startswith(sys.path[0]), vllm_halluguard.server.__file__\n"
        "for name in ('server', 'loadtest', 'helpers', 'testbed', 'vllm_halluguard.testing'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable')\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr + res.stdout


def test_source_checkout_imports_its_own_server_and_loadtest(tmp_path):
    """Imported straight from a checkout (no install, no site-packages), the namespaced subpackages
    are the checkout's top-level folders, and no other folder of the checkout becomes a subpackage."""
    code = (
        f"import importlib, sys; sys.path[:0] = [{str(ROOT)!r}]\n"
        "import vllm_halluguard.server, vllm_halluguard.loadtest\n"
        "print(vllm_halluguard.server.__file__); print(vllm_halluguard.loadtest.__file__)\n"
        "for name in ('tests', 'benchmarks', 'scripts', 'docs', 'deploy'):\n"
        "    try:\n"
        "        importlib.import_module('vllm_halluguard.' + name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'vllm_halluguard.{name} is importable')\n"
    )
    res = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    files = [Path(f).resolve() for f in res.stdout.split()]
    assert files == [ROOT / name / "__init__.py" for name in ("server", "loadtest")]


def test_the_checkout_has_its_own_venv(tmp_path):
    """``scripts/ensure_venv.sh`` builds ``.venv`` inside this checkout, so the package, the server, the
    console scripts and vLLM's plugin entry point resolve to this tree, whatever other checkouts run
    (run without ``PYTHONPATH``, from another folder, as ``make`` and the console scripts do)."""
    venv = ROOT / ".venv"
    assert venv.is_dir() and not venv.is_symlink(), "a venv shared by every checkout runs their code"
    code = (
        "import importlib.metadata as m, vllm_halluguard.server\n"
        "(ep,) = m.entry_points(group='vllm.general_plugins', name='halluguard')\n"
        "print(vllm_halluguard.server.__file__); print(ep.load().__module__)\n"
        "print(m.distribution('vllm-halluguard').read_text('direct_url.json'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [venv / "bin" / "python", "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    server, plugin_module, direct_url = res.stdout.split("\n", 2)
    assert (
        Path(server).resolve() == ROOT / "server" / "__init__.py"
        and plugin_module == "vllm_halluguard.plugin"
    )
    assert json.loads(direct_url)["url"] == ROOT.as_uri(), "the editable install points at this checkout"


# --- import graph -------------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """``vllm_halluguard/engine/__init__.py`` -> ``vllm_halluguard.engine``."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at any level (function bodies included).

    ``from a import b`` counts as an import of ``a.b`` when that is a module, else of ``a``.
    """
    files = shipped_sources()
    modules = {module_name(p): f for p, f in files.items()}
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call):
                targets = dynamic_imports(node)
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def dynamic_imports(call: ast.Call) -> list[str]:
    """The modules a call imports through ``importlib``: ``importlib.import_module("a.b")``, and the
    registry lookup ``implementation("pkg", name, Base)``, which imports ``pkg.<m>`` for every
    registered method ``m`` (``vllm_halluguard.methods.implementation``)."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = call.args[0] if call.args else None
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return []
    if called == "import_module":
        return [first.value]
    if called == "implementation":
        from vllm_halluguard.methods import METHODS

        return [f"{first.value}.{m}" for m in METHODS]
    return []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # server/cli.py imports the fixture builder inside a function; eval/__init__ uses relative imports.
    assert "vllm_halluguard.tiny_models" in graph["vllm_halluguard.server.cli"]
    assert "vllm_halluguard.eval.chair" in graph["vllm_halluguard.eval"]
    assert "vllm_halluguard.server.mitigation" in graph["vllm_halluguard.server.middleware"]
    # the registries import each method's module through importlib (methods.implementation)
    registry = graph["vllm_halluguard.engine.registry"]
    assert {"vllm_halluguard.engine.prunehal", "vllm_halluguard.engine.scr"} <= registry
    assert "vllm_halluguard.reference.kvsmooth" in graph["vllm_halluguard.reference"]


def test_package_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_package_imports_no_test_code():
    """The product never imports the test helpers or the testbed (they do not ship)."""
    for f in shipped_sources().values():
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in {"helpers", "testbed", "tests", "server", "loadtest"}, (f, n)
