"""In-engine behaviour beyond the per-method contract (tests/test_engine_contract.py): FarSight-B on the
native kernel, plain rows bit-identical to vLLM's kernel, prefix-cache isolation, preemption, plain
requests = a run without the plugin."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.parity import Case, Generation, compare, method_case, run_vllm
from vllm_halluguard.engine.runtime import worker_stats

pytestmark = pytest.mark.engine

SPECS = {
    "kvsmooth": "kvsmooth",
    "farsight_b": {"method": "farsight", "mode": "B"},
    "farsight_c": {"method": "farsight", "mode": "C"},
    "farsight_b_sparse": {"method": "farsight", "mode": "B", "sigma": 0.5, "layers": [1, 2]},
}


def test_farsight_b_rows_run_on_the_native_kernel_grouped_by_config(paper_engine):
    """Mode B goes through vLLM's CPU kernel with per-head sinks (s_aux), one call per config; the
    parity tests above check its output, this one that it is the path taken and that mixing
    configs, plain rows and other methods in one batch changes nobody's result."""
    fixture, llm = paper_engine
    specs = [SPECS["farsight_b"], None, SPECS["farsight_b_sparse"], SPECS["kvsmooth"], SPECS["farsight_b"]]
    cases = [method_case(fixture, 60 + i, s) for i, s in enumerate(specs)]
    before = worker_stats_of(llm, fixture)["farsight_native_rows"]
    batch = run_vllm(llm, cases)
    after = worker_stats_of(llm, fixture)["farsight_native_rows"]
    # one row per engine step of each mode-B request: its prefill, then every decode step but the last
    assert after - before == 3 * cases[0].max_tokens
    for case, gen in zip(cases, batch, strict=True):
        (solo,) = run_vllm(llm, [case])
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-5, f"{case.extra_args}: {report}"
    rows = worker_stats_of(llm, fixture)["farsight_native_rows"] - after
    assert rows == 3 * cases[0].max_tokens
    run_vllm(llm, [method_case(fixture, 70, SPECS["farsight_c"])])
    assert worker_stats_of(llm, fixture)["farsight_native_rows"] - after == rows, "mode C stays on torch"


def test_plain_rows_of_a_mixed_batch_are_bit_identical_to_the_native_kernel(paper_engine, monkeypatch):
    """Native first: in a batch with reworked rows (FarSight C prompt rows, PruneHal after its prune),
    the rows the partition hands to vLLM's kernel as a sub-batch get exactly the outputs that kernel
    gives them over the whole batch (checked in the worker at every layer of every such step)."""
    fixture, llm = paper_engine
    monkeypatch.setenv("HALLUGUARD_VERIFY_NATIVE", "1")  # read by the in-process builders every step
    specs = [None, SPECS["farsight_c"], {"method": "prunehal", "r": 0.5}, None, SPECS["kvsmooth"]]
    cases = [method_case(fixture, 90 + i, s) for i, s in enumerate(specs)]
    before = worker_stats_of(llm, fixture)
    run_vllm(llm, cases)
    after = worker_stats_of(llm, fixture)
    assert after["native_checked"] - before["native_checked"] > 0, after
    if torch.get_num_threads() == 1:  # vLLM's CPU kernel is batch-invariant on one thread
        assert after["native_mismatch"] == before["native_mismatch"], after
    else:  # its split-KV scheduling depends on the batch: ULPs, with or without the plugin
        assert after["native_max_diff"] < 1e-6, after


def worker_stats_of(llm, fixture="llava"):
    """Runtime counters, after one plain step delivers the last finished request ids to the worker."""
    run_vllm(llm, [Case(fixture, None, max_tokens=1)])
    (stats,) = llm.collective_rpc(worker_stats)
    return stats


def _cached(llm, case):
    out = llm.generate([_vllm_input(case)], [_params(case)], use_tqdm=False)[0]
    return out.num_cached_tokens or 0


def _vllm_input(case):
    from transformers import AutoProcessor

    from helpers.parity import vllm_inputs
    from vllm_halluguard.tiny_models import ensure_fixture

    return vllm_inputs(AutoProcessor.from_pretrained(ensure_fixture(case.fixture)), case)


def _params(case):
    from helpers.parity import sampling_params

    return sampling_params(Case(case.fixture, case.image_seed, case.prompt, 4, case.extra_args))


def test_prefix_cache_is_isolated_per_method_config(paper_engine):
    fixture, llm = paper_engine
    llm.reset_prefix_cache()
    plain, kvs = method_case(fixture, 40, None), method_case(fixture, 40, SPECS["kvsmooth"])
    kvs_other = method_case(fixture, 40, {"method": "kvsmooth", "lam_ref": 0.5})
    fs = method_case(fixture, 40, SPECS["farsight_b"])
    assert _cached(llm, plain) == 0
    assert _cached(llm, plain) > 0, "plain requests keep sharing the prefix cache"
    assert _cached(llm, kvs) == 0, "a method request must not reuse plain KV"
    assert _cached(llm, kvs) > 0, "identical method configs share"
    # the same effective config spelled out in full (with the model's presets) shares too; the
    # resolution is computed here from the presets, independently of the engine's admission
    from vllm_halluguard.methods import KVSmoothConfig

    num_layers = llm.llm_engine.model_config.hf_config.get_text_config().num_hidden_layers
    preset = KVSmoothConfig.preset(fixture, num_layers)
    spelled = {"method": "kvsmooth", **json.loads(preset.model_dump_json())}
    assert spelled != SPECS["kvsmooth"]
    assert _cached(llm, method_case(fixture, 40, spelled)) > 0, "another spelling of one config shares"
    assert _cached(llm, kvs_other) == 0, "another config of the same method must not share"
    assert _cached(llm, fs) == 0
    assert _cached(llm, plain) > 0


FS_B, FS_C = {"method": "farsight", "mode": "B"}, {"method": "farsight", "mode": "C"}
PRUNE = {"method": "prunehal", "r": 0.5}  # prunes at step 2 (the preset's forced prune)
SCR = {"method": "scr", "top_k": 6, "lam": 1.6}
#: Under preemption: plain, each method alone (FarSight in both modes), every pair and all four.
PREEMPTED_SPECS = [
    None, "kvsmooth", FS_C, FS_B, PRUNE, SCR,
    [SCR, PRUNE], [SCR, "kvsmooth"], [SCR, FS_C], [PRUNE, "kvsmooth"], [PRUNE, FS_B], ["kvsmooth", FS_C],
    [SCR, PRUNE, "kvsmooth", FS_C],
]  # fmt: skip
#: A KV cache of 14 blocks of 32 tokens: 4 prompts with their image; each needs a 4th block at its 9th
#: generated token.
STARVED = {"max_model_len": 256, "kv_cache_memory_bytes": 14 * 32 * 2048}


def _run_preempting(llm, cases, every: int, times: int) -> dict[str, Generation]:
    """Step ``cases`` together; at every ``every``-th step, ``times`` times, vLLM also preempts every
    running request (``reset_prefix_cache(reset_running_requests=True)``), besides the preemptions of
    the starved cache."""
    from transformers import AutoProcessor

    from helpers.parity import sampling_params, vllm_inputs
    from vllm_halluguard.tiny_models import ensure_fixture

    processor = AutoProcessor.from_pretrained(ensure_fixture(cases[0].fixture))
    engine = llm.llm_engine
    for i, case in enumerate(cases):
        engine.add_request(f"p{i}", vllm_inputs(processor, case), sampling_params(case))
    done: dict[str, Generation] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = Generation(list(out.outputs[0].token_ids))
        step += 1
        if step % every == 0 and step // every <= times:
            llm.reset_prefix_cache(reset_running_requests=True)
    return done


def test_preempted_requests_recompute_exactly(engines, monkeypatch):
    """A KV cache of a few blocks, and vLLM preempting all running requests now and then, on a mixed
    batch of every method and composition: every answer equals the same request's answer without
    memory pressure or preemption."""
    from vllm_halluguard.methods import METHODS, parse

    members = [frozenset(parse(s).names) for s in PREEMPTED_SPECS if isinstance(s, list)]
    assert {frozenset(p) for p in itertools.combinations(METHODS, 2)} <= set(members)
    assert frozenset(METHODS) in members
    cases = [
        dataclasses.replace(method_case("llava", 60 + i, s), max_tokens=16)
        for i in range(1)
        for s in PREEMPTED_SPECS
    ]
    llm = engines.get("llava", **STARVED)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted: list[str] = []
    preempt = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    monkeypatch.setattr(scheduler, "_preempt_request", counting)
    done = _run_preempting(llm, cases, every=3, times=20)
    monkeypatch.undo()
    outs = [done[rid] for rid in sorted(done, key=lambda r: int(r.lstrip("p").split("-")[0]))]
    relaxed = run_vllm(engines.get("llava"), cases)  # no memory pressure: nothing is preempted
    differ = [
        (case.extra_args, case.image_seed)
        for case, got, want in zip(cases, outs, relaxed, strict=True)
        if got.token_ids != want.token_ids
    ]
    count = f"{len(differ)} of {len(cases)} answers differ after {len(preempted)} preemptions"
    assert not differ, f"{count}: {differ}"
    assert len(preempted) >= 50, f"only {len(preempted)} preemptions"
    # rows with SCR were preempted after their diagnostic pass (the real request runs) and recomputed
    # with their selection (= the unpreempted answer above): what SCR's own preemption test checks, which
    # the V2 session of tests/test_engine_modes.py leaves to this one
    scr_rows = {
        f"p{i}" for i, s in enumerate(PREEMPTED_SPECS) if s == SCR or (isinstance(s, list) and SCR in s)
    }
    real = {r.split("-")[0] for r in preempted if not r.endswith("+hg-diag")}  # vLLM suffixes the ids
    assert len(scr_rows) == 5 and scr_rows & real, (sorted(scr_rows), sorted(real))
    stats = worker_stats_of(llm)
    assert stats["active"] == 0 and stats["admitted"] == stats["released"], stats


NO_PLUGIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from helpers import engine_modes
    engine_modes.apply()  # the session's engine modes (tests/test_engine_modes.py), before vLLM
    from helpers.parity import Case, engine, run_vllm
    if __name__ == "__main__":
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        import vllm_halluguard.plugin as p
        result = {}
        for fixture in ("llava", "qwen2_vl"):
            with engine(fixture, block_size=32, **engine_modes.engine_overrides()) as llm:
                if engine_modes.selected():
                    engine_modes.check_engine(llm)
                gens = run_vllm(llm, [Case(fixture, image_seed=s) for s in (70, 71)])
            steps = [[{str(k): v for k, v in s.items()} for s in g.logprobs] for g in gens]
            result[fixture] = [[g.token_ids, st] for g, st in zip(gens, steps)]
        backend = AttentionBackendEnum.CPU_ATTN.get_path()
        json.dump({"registered": p.is_registered(), "backend": backend, "gens": result}, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def no_plugin_run(tmp_path_factory):
    """Both fixtures' plain generations from a process where vLLM loads no plugin at all."""
    script = tmp_path_factory.mktemp("no_plugin") / "no_plugin.py"
    script.write_text(NO_PLUGIN_SCRIPT)
    tests_dir = str(Path(__file__).resolve().parent)  # the script imports helpers.*
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "VLLM_PLUGINS": "none-at-all", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plain_requests_equal_a_run_without_the_plugin(paper_engine, no_plugin_run):
    fixture, llm = paper_engine
    assert no_plugin_run["registered"] is False and "halluguard" not in no_plugin_run["backend"]
    mine = run_vllm(llm, [Case(fixture, image_seed=s) for s in (70, 71)])
    for gen, (ids, steps) in zip(mine, no_plugin_run["gens"][fixture], strict=True):
        assert gen.token_ids == ids
        for a, b in zip(gen.logprobs, steps, strict=True):
            assert {str(k): v for k, v in a.items()} == b, "plain rows must be bit-identical"
