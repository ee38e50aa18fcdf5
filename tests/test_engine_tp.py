"""Tensor parallelism: a TP=2 engine (two CPU worker processes, each holding half of the attention heads)
serves every method in one mixed batch equal to the dense reference (tokens, log-probs, PruneHal's keep
masks and SCR's map and selection, on both ranks), and plain requests as without the plugin. The same
runs on a compiled TP=2 engine (no ``--enforce-eager``), where SCR is refused."""

import contextlib
import os

import pytest
import torch
from vllm import envs
from vllm.exceptions import VLLMValidationError

from helpers.method_cases import eager_only, labelled
from helpers.parity import (
    Case,
    assert_free_greedy_agrees,
    compare,
    hf_generate,
    logprob_shift,
    method_case,
    recording_reference,
    run_vllm,
)
from vllm_halluguard.engine.prunehal import prunehal_trace
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.engine.scr import scr_trace
from vllm_halluguard.tiny_models import load_hf

pytestmark = pytest.mark.engine

FIXTURE = "llava"  # 4 query heads, 2 KV heads: each rank holds 2 query heads and 1 KV head
TP = 2
METHOD_ATOL = 1e-3  # the method parity bound of the single-worker suites
#: Engine settings per mode: eager (every method), compiled (Dynamo + Inductor; SCR is refused there).
MODES = {"eager": {}, "compiled": {"enforce_eager": False}}
EAGER_ONLY = eager_only()  # need --enforce-eager (tests/test_engine_compiled.py)
PLAIN_ATOL = 1e-4  # test_parity's bound for plain requests
SPECS = labelled("tensor_parallel")


@contextlib.contextmanager
def _thread_binding_for_ranks():
    """One OpenMP binding per rank: under pytest-xdist both ranks share the worker's core (conftest pins
    it); otherwise one core each. vLLM's automatic binding reserves more cores than this machine has,
    and unbound ranks make every all-reduce wait ~5 ms for the other rank to be scheduled."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    cores = (
        [old] * TP
        if old is not None and old.isdigit()
        else [str(r % (os.cpu_count() or 1)) for r in range(TP)]
    )
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cores)
    # An engine started earlier in this process froze vLLM's env reads (``enable_envs_cache``): unfreeze
    # them so this engine sees the binding, and again after it so later engines see the old one.
    envs.disable_envs_cache()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
        envs.disable_envs_cache()


@pytest.fixture(scope="module", params=list(MODES))
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def llm(engines, mode):
    with _thread_binding_for_ranks():
        llm = engines.get(FIXTURE, tensor_parallel_size=TP, distributed_executor_backend="mp", **MODES[mode])
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == TP
    assert (int(config.compilation_config.mode) != 0) == (mode == "compiled")
    return llm


@pytest.fixture(scope="module")
def hf():
    return load_hf(FIXTURE)


@pytest.fixture(scope="module")
def mixed(llm, mode):
    """One batch: two plain requests around every method (SCR on the eager engine only), with PruneHal's
    and SCR's worker traces of each rank."""
    names = [None, *(n for n in SPECS if mode == "eager" or n not in EAGER_ONLY), None]
    # the single-worker suites' cases (their greedy runs never meet EOS, which the HF reference stops at)
    cases = [method_case(FIXTURE, 5, None if n is None else SPECS[n]) for n in names]
    cases[-1] = Case(FIXTURE, image_seed=10, prompt="Describe the image.")  # test_parity's first case
    llm.collective_rpc(prunehal_trace, args=(True,))
    llm.collective_rpc(scr_trace, args=(True,))
    gens = run_vllm(llm, cases)
    prune_logs = llm.collective_rpc(prunehal_trace, args=(True,))
    scr_logs = llm.collective_rpc(scr_trace, args=(True,))
    assert len(prune_logs) == len(scr_logs) == TP, "one trace per rank"
    return dict(zip(names[1:-1], zip(cases[1:-1], gens[1:-1], strict=True), strict=True)), {
        "plain": list(zip([cases[0], cases[-1]], [gens[0], gens[-1]], strict=True)),
        "prunehal": [list(log.values()) for log in prune_logs],
        "scr": [list(log.values()) for log in scr_logs],
    }


def test_plain_requests_match_the_reference(mixed, hf):
    model, processor = hf
    for case, gen in mixed[1]["plain"]:
        forced = hf_generate(model, processor, case, force=gen.token_ids)
        report = compare(gen, forced)
        assert report.same_tokens and report.max_abs_logprob_diff < PLAIN_ATOL, (report, case)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_method_matches_the_reference(llm, mode, mixed, hf, name):
    model, processor = hf
    spec = SPECS[name]
    if name not in mixed[0]:  # SCR on the compiled engine: refused, and the engine keeps serving
        with pytest.raises(VLLMValidationError, match="--enforce-eager"):
            run_vllm(llm, [method_case(FIXTURE, 5, spec)])
        return
    case, gen = mixed[0][name]
    refs: list = []
    forced = hf_generate(
        model, processor, case, force=gen.token_ids, context=recording_reference(model, spec, refs)
    )
    report = compare(gen, forced)
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    assert_free_greedy_agrees(forced, case)
    plain = hf_generate(model, processor, case, force=gen.token_ids)
    assert logprob_shift(gen, plain) > 1e-3, "the method did not change the run"

    if name.startswith("prunehal"):  # both ranks took the reference's decisions
        trace = refs[0].trace
        ref_prunes = [(r["step"], r["keep"][0]) for r in trace if bool(r["fired"][0])]
        assert ref_prunes, "no prune happened: the test would not exercise the vote"
        order = [n for n in SPECS if n.startswith("prunehal")].index(name)  # records: admission order
        for rank_log in mixed[1]["prunehal"]:
            rec = rank_log[order]
            assert rec["steps"] == trace[-1]["step"] == len(gen.token_ids)
            assert [p["step"] for p in rec["prunes"]] == [s for s, _ in ref_prunes]
            for got, (_, keep) in zip(rec["prunes"], ref_prunes, strict=True):
                assert torch.equal(torch.tensor(got["keep"]), keep)
    if name == "scr":  # both ranks selected the reference's sources from the map over all heads
        ref = refs[0].trace[0]
        for (rec,) in mixed[1]["scr"]:
            got = torch.tensor(rec["attn_map"])
            assert torch.allclose(got, ref["attn_map"][0].float(), atol=1e-6, rtol=1e-4)
            assert rec["sources"] == ref["sources"][0].tolist()
            assert rec["owner"] == ref["owner"][0].tolist()
            assert any(s >= 0 for s in rec["sources"])


def test_ranks_kept_identical_books(llm, mixed):
    """Every rank admitted and released the same requests (both run the same per-request state)."""
    run_vllm(llm, [Case(FIXTURE, None, max_tokens=1)])  # delivers the last finished ids to the workers
    stats = llm.collective_rpc(worker_stats)
    assert len(stats) == TP
    keys = ("admitted", "released", "active", "scr_edits")
    assert all({k: s[k] for k in keys} == {k: stats[0][k] for k in keys} for s in stats), stats
    assert stats[0]["active"] == 0 and stats[0]["admitted"] >= len(mixed[0])
    assert (stats[0]["scr_edits"] >= 1) == ("scr" in mixed[0])
