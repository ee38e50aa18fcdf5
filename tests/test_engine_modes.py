"""The engine suites in the modes vLLM uses on GPUs: the V2 model runner and async scheduling.

The V2 runner must be chosen before vLLM is imported, so the V2 + async mode runs the selected tests
of the engine suites in its own pytest process (``HALLUGUARD_TEST_ENGINE_MODE``, see
:mod:`helpers.engine_modes`; every engine there is checked to run in the mode), with that session's
engines shared across its tests. The V1 runner with async scheduling runs in this session: the
selected tests' bodies on engines of the session's pool built with ``async_scheduling=True`` (each
checked to run async; every other engine stays as vLLM's CPU platform configures it). The test bodies
are the suites' own: parity with HF and with each method's dense reference, mixed batches equal to
solo runs, preemption, prefix-cache isolation and SCR's two passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import test_engine_contract as contract
import test_engine_methods as methods
import test_engine_scr as scr
from helpers import engine_modes
from helpers.engine_modes import MODE_ENV

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent

#: Per mode: the test files and the ``-k`` selection within them, and the test functions that must
#: have run (and passed) in that selection.
RUNS = {
    # The GPU defaults: V2 runner, async scheduling. Both fixtures (LLaVA; Qwen2-VL's M-RoPE grid).
    "v2,async": (
        [
            "test_parity.py",
            "test_engine_contract.py",
            "test_engine_methods.py",
            "test_engine_scr.py",
            "test_engine_prunehal.py",
        ],
        " or ".join(
            [
                "test_vllm_matches_hf",
                "test_batch_of_four",
                # one config per method and route (the preset; FarSight's mode B runs vLLM's kernel with
                # sinks): the other configs vary the methods' math, which the runner does not feed.
                # PruneHal's and SCR's presets: their test_decisions_match_reference below runs the same
                # request against the same reference and checks what this test checks, and more
                "(test_engine_contract and ((test_engine_matches_reference and (kvsmooth-preset"
                " or farsight-preset or farsight-b])) or test_mixed_batch))",
                "(test_engine_methods and (test_preempted or test_prefix_cache"
                " or test_plain_requests_equal))",
                # SCR's preemption test: the methods' one runs SCR (alone and in 4 compositions) on the
                # same starved engine with more preemptions, and checks SCR rows were preempted
                "(test_engine_scr and ((test_decisions and preset) or (test_prefix_cache and llava)))",
                "(test_engine_prunehal and test_decisions and preset)",
            ]
        ),
        {
            "test_vllm_matches_hf_greedy_and_teacher_forced_logprobs",
            "test_batch_of_four_matches_solo_runs",
            "test_engine_matches_reference",
            "test_mixed_batch_of_every_method_equals_solo_runs",
            "test_preempted_requests_recompute_exactly",
            "test_prefix_cache_is_isolated_per_method_config",
            "test_plain_requests_equal_a_run_without_the_plugin",
            "test_decisions_match_reference",
            "test_prefix_cache_is_never_read_by_or_from_scr",
        },
    ),
}


def _results(junit: Path) -> dict[str, str]:
    """``file::test[id]`` -> ``passed`` / ``failed`` / ``error`` / ``skipped`` from a JUnit report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "failed" if tag == "failure" else tag
        out[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", list(RUNS))
def test_engine_suites_pass_in_mode(mode, tmp_path):
    files, selection, required = RUNS[mode]
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-k", selection, *(str(ROOT / "tests" / f) for f in files)]  # fmt: skip
    env = {**os.environ, MODE_ENV: mode}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1150)
    assert junit.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    results = _results(junit)
    bad = {name: outcome for name, outcome in results.items() if outcome != "passed"}
    assert res.returncode == 0 and not bad, f"{bad}\n{res.stdout[-6000:]}"
    ran = {name.split("::")[-1].split("[")[0] for name in results}
    assert required <= ran, f"not run in mode {mode}: {sorted(required - ran)}"


# ---------------------------------------------------- V1 runner, async scheduling (in this session)


class AsyncEngines:
    """The session's engine pool with ``async_scheduling=True`` added to every engine's settings."""

    def __init__(self, engines) -> None:
        self._engines = engines

    def get(self, fixture: str, **overrides: object):
        return self._engines.get(fixture, async_scheduling=True, **overrides)


@pytest.fixture(scope="module")
def async_engines(engines) -> AsyncEngines:
    return AsyncEngines(engines)


@pytest.fixture(scope="module")
def async_llava(async_engines):
    """``paper_engine`` for LLaVA with async scheduling."""
    return "llava", async_engines.get("llava")


def test_async_engines_run_async_and_the_others_as_before(engines, async_llava):
    """Only an engine asked for ``async_scheduling=True`` keeps it on CPU; the default one stays sync."""
    engine_modes.check_engine(async_llava[1], {"async"})
    engine_modes.check_engine(engines.get("llava"), set())


@pytest.mark.parametrize(("name", "label"), contract.SPEC_CASES)
def test_engine_matches_reference_with_async_scheduling(async_llava, hf_models, name, label):
    contract.test_engine_matches_reference(async_llava, hf_models.get("llava"), name, label)


def test_mixed_batch_of_every_method_equals_solo_runs_with_async_scheduling(async_llava):
    contract.test_mixed_batch_of_every_method_equals_solo_runs(async_llava)


def test_preempted_requests_recompute_exactly_with_async_scheduling(async_engines, monkeypatch):
    methods.test_preempted_requests_recompute_exactly(async_engines, monkeypatch)


def test_preempted_scr_requests_recompute_with_their_selection_with_async_scheduling(async_engines):
    scr.test_preempted_scr_requests_recompute_with_their_selection(async_engines)
