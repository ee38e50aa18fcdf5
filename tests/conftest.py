"""Shared test settings.

Engines in tests run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each vLLM process pays
~20 s of imports on this CPU, and an in-process engine saves two of them. The server test runs the
real multi-process server, which also proves the plugin loads in vLLM's engine processes.
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (``make test`` runs two workers), pin each worker's in-process engines to its own
# core; vLLM's automatic binding would put both on core 0 and reserve core 1 for an API process.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(int(_worker[2:]) % (os.cpu_count() or 1))

# Without a GPU, our Triton kernels run in Triton's interpreter; the variable must be set before
# any module decorates a kernel (vLLM's own Triton is disabled on its CPU build either way).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("HALLUGUARD_TEST_PLAIN_INTERPRETER") != "1":
    from helpers import triton_interp

    # the same interpretation without re-patching triton.language at each device-function call
    # (tests/test_triton_interp.py checks it against the plain interpreter)
    triton_interp.install()


from helpers import engine_modes  # noqa: E402 (after the env above)

# HALLUGUARD_TEST_ENGINE_MODE=v2,async: the V2 model runner / async scheduling for every engine of
# the session, set up before vLLM is imported (tests/test_engine_modes.py runs suites this way).
ENGINE_MODES = engine_modes.apply()

from helpers.markers import unmarked  # noqa: E402
from helpers.parity import make_llm, shutdown_llm  # noqa: E402 (after the env above)
from helpers.server import STARTS, SharedServer, SharedServers, StartRecord  # noqa: E402
from vllm_halluguard.tiny_models import FIXTURES, load_hf  # noqa: E402

#: Settings of the shared engines: the smallest CPU block size, so prompts and generations cross
#: block boundaries (the methods edit and read the paged cache across them).
SHARED_ENGINE = {"block_size": 32, **engine_modes.engine_overrides()}


class EnginePool:
    """In-process vLLM engines shared by every test module of the session (one per settings).

    Engines are only shut down at the end of the session: vLLM keeps its parallel groups in
    process-global state, and shutting one engine down tears them down for every other engine of
    the process. Tests therefore never stop an in-process engine themselves.
    """

    def __init__(self) -> None:
        self._engines: dict[tuple, object] = {}

    def get(self, fixture: str, **overrides: object):
        key = (fixture, tuple(sorted(overrides.items())))
        if key not in self._engines:
            kwargs = {**SHARED_ENGINE, **overrides}
            modes = set(ENGINE_MODES)
            if kwargs.get("async_scheduling") is True:  # kept on CPU for this engine only
                engine_modes.keep_explicit_async_scheduling_on_cpu()
                modes.add("async")
            llm = make_llm(fixture, **kwargs)
            if modes:
                engine_modes.check_engine(llm, modes)
            self._engines[key] = llm
        return self._engines[key]

    def close(self) -> None:
        """At the session's end: stop the engines that run worker processes (tensor parallel). An
        in-process engine is left to the process's exit, its exit-time shutdown dropped: each shutdown
        tears down vLLM's parallel groups and runs two full garbage collections (3–9 s per engine on
        this machine, ~26 s per worker at the end of ``make test``) for memory the exit frees anyway."""
        for llm in self._engines.values():
            client = llm.llm_engine.engine_core
            if type(llm.llm_engine.model_executor).__name__ == "UniProcExecutor" and hasattr(
                client, "_finalizer"
            ):
                client._finalizer.detach()
            else:
                shutdown_llm(llm)
        self._engines.clear()


@pytest.fixture(scope="session")
def engines():
    pool = EnginePool()
    yield pool
    pool.close()


class HFModels:
    """HF ``(model, processor)`` pairs of the tiny fixtures, loaded once per session (worker).

    Tests only run the models (``generate``, the reference context managers restore what they
    patch), so one copy serves every module.
    """

    def __init__(self) -> None:
        self._models: dict[str, tuple] = {}

    def get(self, fixture: str) -> tuple:
        if fixture not in self._models:
            self._models[fixture] = load_hf(fixture)
        return self._models[fixture]


@pytest.fixture(scope="session")
def hf_models() -> HFModels:
    return HFModels()


@pytest.fixture(scope="module", params=FIXTURES)
def paper_engine(request, engines):
    """``(fixture, engine)`` for each paper architecture: the session's shared engine (``block_size=32``)."""
    return request.param, engines.get(request.param)


@pytest.fixture(scope="module")
def hf_model(paper_engine, hf_models):
    """The HF ``(model, processor)`` of ``paper_engine``'s fixture (shared across modules)."""
    return hf_models.get(paper_engine[0])


_SERVERS = pytest.StashKey[SharedServers]()


@pytest.fixture(scope="session")
def shared_servers(request, tmp_path_factory) -> SharedServers:
    """The session's shared real servers (``helpers.server.SharedServers``), one per configuration."""
    servers = SharedServers(tmp_path_factory.mktemp)
    request.config.stash[_SERVERS] = servers
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def plain_server(shared_servers) -> SharedServer:
    """The plain tiny server (``make serve``), shared by every module that needs it."""
    return shared_servers.get("plain")


@pytest.fixture(scope="module")
def keyed_server(shared_servers) -> SharedServer:
    """The keyed server (``helpers.server.keyed_command``: API key, allow-list, default method, media
    fetching for 127.0.0.1), shared by ``test_server_api`` and ``test_server_security``."""
    return shared_servers.get("keyed")


#: Test modules that share a session resource form one group: under ``make test`` (``--dist loadfile``)
#: a group goes to one worker as a unit (:func:`pytest_xdist_make_scheduler`) and every session runs
#: it contiguously, so the resource starts once. Every other module is a group of its own.
GROUPS = {
    "test_serve.py": "plain_server",
    "test_loadtest.py": "plain_server",
    "test_eval_runner.py": "plain_server",
    "test_docs.py": "plain_server",
    "test_server_api.py": "keyed_server",
    "test_server_security.py": "keyed_server",
}
#: Seconds per group, summed --durations=0 of the baseline run on the shared machine (docs/testing.md;
#: the ratios matter); groups start longest first. A group not listed counts as :data:`DEFAULT_COST_S`.
COST_S: dict[str, float] = {
    "test_engine_contract.py": 2847,
    "test_engine_compose.py": 2006,
    "test_engine_scr.py": 1230,
    "test_engine_modes.py": 510,  # 590 x 718/832 CPU s: SCR preemption and repeated plain runs out of V2
    "test_engine_tp.py": 558,
    "test_engine_prunehal.py": 337,
    "plain_server": 346,  # with test_docs.py (~80)
    "test_testbed.py": 267,
    "test_fixtures.py": 254,
    # test_server_api (215) + test_server_security (93), less the second server start (~65 s unshared):
    "keyed_server": 240,
    "test_served_vlms.py": 143,
    "test_server_fuzz.py": 73,
    "test_reference_api.py": 71,
    "test_engine_triton.py": 66,
    "test_engine_methods.py": 263,  # with the preemption test added after the baseline (~200)
    "test_engine_prunehal_reclaim.py": 53,
    "test_engine_compiled.py": 42,
    # Added after the baseline, estimated from their single-file runs on the same loaded machine:
    "test_engine_gpu_backends.py": 575,  # 620 x 401/433 CPU s: no second run of the preempted batch
    "test_server_hardening.py": 300,
    "test_check.py": 220,
    "test_gpu_check.py": 160,
    "test_mitigations_listing.py": 120,
    "test_engine_graphs.py": 45,
    "test_engine_host_step.py": 33,
    "test_method_contract_dummy.py": 10,
    "test_kernel_warmup.py": 3,
    "test_engine_prunehal_sync.py": 1,
    "test_engine_syncs.py": 90,  # PruneHal, its compositions and a mixed batch added (estimated from 48)
}
DEFAULT_COST_S = 10.0


def group_of(path: str) -> str:
    """The group of a test file (its name, or its entry in :data:`GROUPS`)."""
    name = Path(path.split("::", 1)[0]).name
    return GROUPS.get(name, name)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown under ``-p no:xdist``
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with :data:`GROUPS`: a work unit is a group of files, in collection order.

    (xdist's own ``--dist loadgroup`` does not group under pytest 9: it renames ``item._nodeid``,
    which pytest 9 no longer reads.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order of the collection
    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse to run a test that starts an engine or a server without its marker (``-m`` selects them);
    run each group's tests contiguously, the groups longest first (:data:`COST_S`)."""
    problems = unmarked(items)
    if problems:
        raise pytest.UsageError("tests missing the engine/server marker:\n  " + "\n  ".join(problems))
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(group_of(item.nodeid), i)

    def order(item: pytest.Item) -> tuple[float, int]:
        group = group_of(item.nodeid)
        return (-COST_S.get(group, DEFAULT_COST_S), first[group])

    items.sort(key=order)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop a shared server once the next test is in another group and does not use it."""
    try:
        return (yield)
    finally:
        servers = item.config.stash.get(_SERVERS, None)
        if servers is not None:
            for name in servers.running():
                if nextitem is None or (
                    group_of(nextitem.nodeid) != group_of(item.nodeid)
                    and f"{name}_server" not in nextitem.fixturenames
                ):
                    servers.stop(name)


#: Server starts reported by the xdist workers (``pytest_testnodedown``), printed by the controller.
_WORKER_STARTS: list[StartRecord] = []


def pytest_sessionfinish(session):
    """An xdist worker hands its server starts (``helpers.server.STARTS``) to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["server_starts"] = [dataclasses.astuple(s) for s in STARTS]


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node, error):
    output = getattr(node, "workeroutput", None) or {}
    _WORKER_STARTS.extend(StartRecord(*s) for s in output.get("server_starts", ()))


#: Seconds of setup, call and teardown per test file, and per xdist worker (``pytest_runtest_logreport``).
_FILE_SECONDS: dict[str, float] = {}
_WORKER_SECONDS: dict[str, float] = {}
SLOWEST_FILES = 25


def pytest_runtest_logreport(report):
    """Add a report's duration to its file's and its worker's sums (on the controller under xdist)."""
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration
    worker = getattr(getattr(report, "node", None), "gateway", None)
    name = getattr(worker, "id", "main")
    _WORKER_SECONDS[name] = _WORKER_SECONDS.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The slowest test files and each worker's busy seconds (setup + call + teardown summed), then one
    line per real server start: seconds to healthy, CPU seconds of its processes by then."""
    if _FILE_SECONDS:
        total = sum(_FILE_SECONDS.values())
        terminalreporter.section(f"slowest {SLOWEST_FILES} files: {total:.0f} s of tests in all")
        for path, sec in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:SLOWEST_FILES]:
            terminalreporter.write_line(f"{sec:8.1f} s  {path}")
        busy = ", ".join(f"{name} {sec:.0f} s" for name, sec in sorted(_WORKER_SECONDS.items()))
        terminalreporter.write_line(f"busy per worker: {busy}")
    starts = STARTS + _WORKER_STARTS
    if not starts:
        return
    cpu = sum(s.cpu_s for s in starts)
    terminalreporter.section(f"server starts: {len(starts)}, {cpu:.0f} CPU s to healthy")
    for s in starts:
        terminalreporter.write_line(
            f"{s.name:<24} {s.wall_s:6.1f} s to healthy  {s.cpu_s:6.1f} CPU s  {s.processes} processes"
        )
