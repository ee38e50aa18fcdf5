"""vLLM's GPU attention backends in the CPU engine: the plugin's wrapped TRITON_ATTN and FLASH_ATTN (FA3),
selected through the CUDA platform's class-path resolution (:mod:`helpers.gpu_backends`).

One extra process (the mode must be set before vLLM is imported) first starts one engine without the
plugin per run (vLLM loads no plugin there yet), then one engine with it per run (FA3 and TRITON_ATTN
on the V1 runner, then both on the V2 runner with async scheduling) and runs one mixed batch: plain
rows, every method, FarSight's two modes, PruneHal's reclaiming variant (V1; refused at admission on
V2) and compositions (on TRITON_ATTN V2: a plain row and the two compositions, which hold every
method). Here, per run: the engine ran the runner, scheduler and wrapped class it was given; every
mitigated row = the dense reference (tokens, log-probs, free greedy run); the plain rows = the
native kernel over the whole batch (``HALLUGUARD_VERIFY_NATIVE``) and = the same plain requests on
the engine without the plugin (vLLM's own backend class, same runner and scheduling): bit for bit on
FLASH_ATTN, within :data:`TRITON_ROUNDING` on TRITON_ATTN (its kernel choice follows the batch);
FlashAttention got FA3's arguments within the real ops' contracts (bf16 ``s_aux`` included), or the
run fails. Untested on a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.gpu_backends import MAX_TOKENS, NO_PLUGIN, PREEMPTION, RUNS, cases_of, preempted_cases
from helpers.parity import Case, Generation, assert_free_greedy_agrees, compare, hf_generate
from helpers.sync_sentinel import STEP_BOUND
from vllm_halluguard import reference
from vllm_halluguard.tiny_models import load_hf

pytestmark = pytest.mark.engine

WRAPPED = "vllm_halluguard.engine.backends."
CLASSES = {"TRITON_ATTN": "HGTritonAttentionBackend", "FLASH_ATTN": "HGFlashAttentionBackend"}
KEYS = [r[0] for r in RUNS]
BACKEND = {r[0]: r[1] for r in RUNS}
V2 = {r[0] for r in RUNS if r[3]}
FA_RUNS = [k for k in KEYS if BACKEND[k] == "FLASH_ATTN"]
#: The runs with prefix-cache and preemption checks, and the fewest preemptions each must see (the
#: interpreted TRITON_ATTN run on V2 preempts a 3-row batch twice).
PREEMPTIONS = {**{k: 8 for k in FA_RUNS}, "TRITON_ATTN_V2": 3}
assert set(PREEMPTIONS) == set(PREEMPTION)
#: TRITON_ATTN's ``unified_attention`` takes its split 3D kernel for a decode-only batch of few enough
#: sequences and the 2D one otherwise, so a row's rounding follows the batch it runs in, with or without
#: the plugin (docs/architecture.md, plain rows of a mixed step): plain rows are compared within this.
TRITON_ROUNDING = 1e-5
#: vLLM's own backend classes (what an engine without the plugin must run).
NATIVE = {
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend",
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
}
V1_ENGINE = {"v2": False, "scheduler": "Scheduler", "batch_queue": False}
V2_ENGINE = {"v2": True, "scheduler": "AsyncScheduler", "batch_queue": True}  # vLLM 0.32 on Hopper


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_backends") / "gens.json"
    tests_dir = str(Path(__file__).parent)  # where ``helpers`` lives
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "helpers.gpu_backends", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf():
    return load_hf("llava")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("key", KEYS)
def test_gpu_backend_serves_every_method_as_the_reference(gpu_run, hf, key):
    run = gpu_run[key]
    assert run["engine"] == (V2_ENGINE if key in V2 else V1_ENGINE), run["engine"]
    assert run["backends"] == [WRAPPED + CLASSES[BACKEND[key]]], "the engine must run the wrapped backend"
    stats = run["stats"]
    assert stats["native_checked"] > 0, stats
    if key == "TRITON_ATTN_V2":  # unified_attention's 2D/3D choice follows the batch's shape (V1: exact)
        assert stats["native_max_diff"] <= TRITON_ROUNDING, stats
    else:
        assert stats["native_mismatch"] == 0, stats
    assert stats["kernel_rows"] > 0, "the project's kernel must have computed the reworked rows"
    if key in V2:  # the reclaim is refused at admission on V2 (and under async scheduling)
        assert stats["prunehal_freed_blocks"] == 0, stats
        assert "invalid halluguard method" in run["reclaim_refusal"], run["reclaim_refusal"]
        assert "needs vLLM's V1 model runner" in run["reclaim_refusal"], run["reclaim_refusal"]
    else:  # accepted on V1 with synchronous scheduling
        assert stats["prunehal_freed_blocks"] >= 1, stats
    assert stats["active"] == 0 and stats["admitted"] == stats["released"], stats
    if BACKEND[key] == "FLASH_ATTN":
        assert run["fa_versions"] == [3], run["fa_versions"]
        # FarSight B ran as FA3's native sink lane, with bf16 s_aux; plain steps used FA3's schedule
        assert stats["farsight_native_rows"] > 0, stats
        assert "fa3:torch.bfloat16:False" in run["fa_calls"] and "fa3:None:True" in run["fa_calls"], run[
            "fa_calls"
        ]
    plain = [g for (_, spec), g in zip(cases_of(key), run["gens"], strict=True) if spec is None]
    for (seed, spec), got in zip(cases_of(key), run["gens"], strict=True):
        _assert_reference(hf, key, seed, spec, MAX_TOKENS, got)
    assert plain, "the batch must hold plain rows"


def _assert_reference(hf, key, seed, spec, max_tokens, got):
    """The engine's row ``got`` = the dense reference of ``spec`` (HF, plain for ``None``): tokens, top-k
    log-probs, and the reference's free greedy run gives these tokens."""
    model, processor = hf
    extra = None if spec is None else {"halluguard": spec}
    case = Case("llava", seed, max_tokens=max_tokens, extra_args=extra)
    gen = Generation(got["token_ids"], [{int(k): v for k, v in s.items()} for s in got["logprobs"]])
    assert len(gen.logprobs) == max_tokens, f"{key} {spec}: {len(gen.logprobs)} steps of log-probs"

    def ctx():
        return reference.apply(model, spec)

    ref = hf_generate(model, processor, case, force=gen.token_ids, context=ctx if spec else None)
    report = compare(gen, ref)
    assert report.same_tokens and report.max_abs_logprob_diff < 1e-3, f"{key} {spec}: {report}"
    assert_free_greedy_agrees(ref, case)  # the reference's free greedy run gives these tokens


@pytest.mark.parametrize("key", KEYS)
def test_gpu_backend_layer_calls_do_not_sync_the_host(gpu_run, key):
    """The sync sentinel (:mod:`helpers.sync_sentinel`) around the mixed batch of every run: no op in a
    layer call that would make the host wait for the stream, at most :data:`STEP_BOUND` counted per
    step's plan, every copy non-blocking, and PruneHal's decisions read from their host buffers only.
    That the sentinel counts in this process shows in the steps' counted copy."""
    syncs = gpu_run[key]["syncs"]
    assert syncs["layer_calls"] > 0 and syncs["steps"] > 0, syncs
    assert syncs["step"] > 0, "the sentinel must see each step's one host-to-device copy"
    assert syncs["layer"] == 0, syncs["events"]["layer"]
    assert syncs["most_in_one_step"] <= STEP_BOUND, syncs["events"]["step"]
    assert not syncs["blocking"], syncs["blocking"]
    assert syncs["read"] == 0, syncs["events"]["read"]
    if any(spec is not None and "prunehal" in json.dumps(spec) for _, spec in cases_of(key)):
        assert syncs["reads"] > 0, "the host must have read PruneHal's decisions"


@pytest.mark.parametrize("key", [k for k in KEYS if k in NO_PLUGIN])
def test_plain_rows_equal_an_engine_without_the_plugin(gpu_run, key):
    """The plain rows of the mixed batch = the same plain requests on an engine that loaded no plugin
    (same backend and stand-ins, runner and scheduling): token ids, and log-probs bit for bit on
    FLASH_ATTN (the stand-in is batch-invariant), within :data:`TRITON_ROUNDING` on TRITON_ATTN."""
    run = gpu_run[key]
    ref = run["no_plugin"]
    assert ref["registered"] is False, "the reference engine's process must not have loaded the plugin"
    assert ref["backends"] == [NATIVE[BACKEND[key]]], ref["backends"]  # vLLM's class, not the wrapped one
    assert ref["engine"] == run["engine"], (ref["engine"], run["engine"])
    plain = [g for (_, spec), g in zip(cases_of(key), run["gens"], strict=True) if spec is None]
    assert plain and len(plain) == len(ref["gens"])
    for got, want in zip(plain, ref["gens"], strict=True):
        assert got["token_ids"] == want["token_ids"], f"{key}: plain tokens differ from the no-plugin engine"
        if BACKEND[key] == "FLASH_ATTN":
            assert got["logprobs"] == want["logprobs"], (
                f"{key}: plain log-probs differ from the no-plugin engine"
            )
            continue
        for a, b in zip(got["logprobs"], want["logprobs"], strict=True):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) <= TRITON_ROUNDING, (key, a, b)


@pytest.mark.parametrize("key", list(PREEMPTIONS))
def test_gpu_backend_keeps_prefix_cache_isolation_and_recovers_from_preemption(gpu_run, hf, key):
    """Prefix-cache isolation, and a batch stepped under recompute preemption (plain rows, methods and a
    composition; PruneHal's replayed) = the dense reference, row by row, as the mixed batch (which is not
    preempted) is: so each row equals its answer without preemption, and is right."""
    run = gpu_run[key]
    cached = run["prefix_cache"]
    assert cached["plain"] == 0 and cached["plain_again"] > 0, cached  # plain requests share
    assert cached["kvsmooth"] == 0 and cached["kvsmooth_again"] > 0, cached  # a method never reads plain KV
    assert cached["farsight_b"] == 0 and cached["plain_last"] > 0, cached
    pre = run["preemption"]
    assert pre["preempted"] >= PREEMPTIONS[key], f"only {pre['preempted']} preemptions"
    assert pre["stats"]["active"] == 0 and pre["stats"]["admitted"] == pre["stats"]["released"], pre["stats"]
    # every row, mitigated ones included (replayed after recompute), = the reference
    for (seed, spec, max_tokens), got in zip(preempted_cases(key), pre["batch"], strict=True):
        _assert_reference(hf, key, seed, spec, max_tokens, got)
