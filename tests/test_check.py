"""``halluguard-check`` (vllm_halluguard/check.py): its verdict logic, and the whole command on the
tiny LLaVA fixture on CPU (the same code an operator runs on a GPU node with real weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_halluguard.check import agreement, plain_report
from vllm_halluguard.parity import Generation

ROOT = Path(__file__).resolve().parent.parent


def gen(ids: list[int], steps: list[dict[int, float]]) -> Generation:
    return Generation(ids, steps)


def test_agreement_counts_the_reference_argmax_or_a_near_tie():
    ref = gen([5, 6], [{5: -0.1, 6: -2.0}, {5: -0.50, 6: -0.5005}])
    assert agreement(gen([5, 6], []), ref, 1e-3) == 1.0  # step 2 is a near tie
    assert agreement(gen([5, 5], []), ref, 1e-3) == 1.0
    assert agreement(gen([6, 6], []), ref, 1e-3) == 0.5  # step 1: the reference prefers 5 by 1.9
    assert agreement(gen([5, 6], []), ref, 1e-4) == 0.5


def test_plain_report_needs_identical_runs_and_no_plugin_in_the_other_process():
    mine = [gen([1, 2], [{1: -0.25, 3: -1.5}, {2: -0.125}])]
    theirs = {
        "registered": False,
        "gens": [{"ids": [1, 2], "logprobs": [{"1": -0.25, "3": -1.5}, {"2": -0.125}]}],
    }
    assert plain_report(mine, theirs, 0.0) == {"pass": True, "max_abs_logprob_diff": 0.0}
    shifted = json.loads(json.dumps(theirs))
    shifted["gens"][0]["logprobs"][1]["2"] = -0.126
    report = plain_report(mine, shifted, 0.0)
    assert not report["pass"] and report["max_abs_logprob_diff"] == pytest.approx(1e-3)
    assert plain_report(mine, shifted, 2e-3)["pass"]
    assert not plain_report(mine, {**theirs, "registered": True}, 0.0)["pass"]
    other_ids = {"registered": False, "gens": [{**theirs["gens"][0], "ids": [1, 3]}]}
    assert not plain_report(mine, other_ids, 0.0)["pass"]


@pytest.mark.engine
def test_halluguard_check_passes_on_the_tiny_llava(tmp_path):
    """The command an operator runs first, end to end: a no-plugin process, the plugin engine, the
    dense reference of every method and a composition, the latency table and the JSON file."""
    out = tmp_path / "check.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vllm_halluguard.check", "--fixture", "llava", "--images", "1"]
    res = subprocess.run(
        [*cmd, "--max-tokens", "6", "--json", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pass"] and result["plain_vs_no_plugin"] == {"pass": True, "max_abs_logprob_diff": 0.0}
    rows = {r["method"]: r for r in result["methods"]}
    assert set(rows) == {"plain", "kvsmooth", "prunehal", "farsight", "scr", "kvsmooth+farsight"}
    for name, row in rows.items():
        assert row["pass"] and row["token_agreement"] == 1.0, row
        assert 0.0 < row["max_abs_logprob_diff"] < 1e-3, row  # compared for real (fp32, not bit-equal)
        assert row["seconds"] > 0 and row["overhead"] > 0, row
        assert f"| {name} | PASS |" in res.stdout
    assert res.stdout.rstrip().endswith("PASS")
