"""The engine suites in the modes vLLM uses on GPUs: the V2 model runner and async scheduling.

A mode must be chosen before vLLM is imported, so each runs the selected tests of the engine suites
in its own pytest process (``HALLUGUARD_TEST_ENGINE_MODE``, see
:mod:`helpers.engine_modes`; every engine there is checked to run in the mode), with
that session's engines shared across its tests. The test bodies are the suites' own: parity with HF
and with each method's dense reference, mixed batches equal to solo runs, preemption, prefix-cache
isolation and SCR's two passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

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
                # sinks): the other configs vary the methods' math, which the runner does not feed
                "(test_engine_contract and ((test_engine_matches_reference and (preset or farsight-b]))"
                " or test_mixed_batch))",
                "(test_engine_methods and (test_preempted or test_prefix_cache"
                " or test_plain_requests_equal))",
                "(test_engine_scr and ((test_decisions and preset) or test_preempted"
                " or (test_prefix_cache and llava)))",
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
            "test_preempted_scr_requests_recompute_with_their_selection",
            "test_prefix_cache_is_never_read_by_or_from_scr",
        },
    ),
    # The CPU default runner (V1) with async scheduling: LLaVA.
    "async": (
        ["test_engine_contract.py", "test_engine_methods.py", "test_engine_scr.py"],
        "(llava and test_engine_contract and (test_engine_matches_reference or test_mixed_batch))"
        " or test_preempted",
        {
            "test_engine_matches_reference",
            "test_mixed_batch_of_every_method_equals_solo_runs",
            "test_preempted_requests_recompute_exactly",
            "test_preempted_scr_requests_recompute_with_their_selection",
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
