"""The GPU code path inside the CPU engine (native kernel for plain rows, the Triton kernel interpreted
for mitigated rows), vs the reference; plain rows bit-identical to the native kernel's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.parity import Case, Generation, assert_free_greedy_agrees, compare, hf_generate
from helpers.triton_mode import CASES, MAX_TOKENS
from vllm_halluguard import reference
from vllm_halluguard.tiny_models import FIXTURES

pytestmark = pytest.mark.engine

WRAPPED_CPU = "vllm_halluguard.engine.backends.HGCPUAttentionBackend"


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "gens.json"
    tests_dir = str(Path(__file__).parent)  # where ``helpers`` lives
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "helpers.triton_mode", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("fixture", FIXTURES)
def test_engine_launches_only_warmed_specialisations(triton_run, fixture):
    """The warm-up, enumerating from the engine's own layers (caches, heads, dtype), lists every kernel
    specialisation the mixed batch launched: on a GPU none would compile while serving. (CPU: no SMs,
    so no split-KV; tests/test_kernel_warmup.py covers the split counts.)"""
    launched, warmed = set(triton_run[fixture]["kernel_keys"]), set(triton_run[fixture]["warmup_keys"])
    assert launched and warmed
    assert launched <= warmed, f"{len(launched - warmed)} specialisations launched that the warm-up missed"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_triton_backend_matches_reference(triton_run, hf_models, fixture):
    run = triton_run[fixture]
    assert run["backends"] == [WRAPPED_CPU], "the engine must have run the wrapped native backend"
    stats = run["stats"]
    assert stats["kernel_rows"] > 0, "the Triton kernel must have computed the mitigated rows"
    assert stats["native_checked"] > 0 and stats["native_mismatch"] == 0, stats
    if fixture == "llava":  # the reclaiming case freed its image-only block; the kernel read the null block
        assert stats["prunehal_freed_blocks"] >= 1, stats
    model, processor = hf_models.get(fixture)
    for (seed, spec), got in zip(CASES, run["gens"], strict=True):
        extra = None if spec is None else {"halluguard": spec}
        case = Case(fixture, seed, max_tokens=MAX_TOKENS, extra_args=extra)
        gen = Generation(got["token_ids"], [{int(k): v for k, v in s.items()} for s in got["logprobs"]])

        def ctx(spec=spec):
            return reference.apply(model, spec)

        ref = hf_generate(model, processor, case, force=gen.token_ids, context=ctx if spec else None)
        report = compare(gen, ref)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-3, f"{spec}: {report}"
        assert_free_greedy_agrees(ref, case)
