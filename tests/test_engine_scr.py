"""In-engine SCR beyond the per-method contract (tests/test_engine_contract.py): its decisions are the
reference's (the diagnostic map and the selection), early exit, no diagnostic for no-op configs,
chunked prefill, preemption, prefix-cache isolation, aborting a request while its diagnostic runs, and
the admission checks."""

from types import SimpleNamespace

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from helpers.parity import (
    Case,
    assert_free_greedy_agrees,
    compare,
    hf_generate,
    logprob_shift,
    method_case,
    plain_answer,
    recording_reference,
    run_vllm,
    sampling_params,
    vllm_inputs,
)
from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY, check_inputs, resolve
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.engine.scr import scr_trace

METHOD_ATOL = 1e-3
SPECS = {
    "preset": "scr",
    "strong": {"method": "scr", "top_k": 6, "lam": 1.6, "diag_layers": [1, 2, 3], "layers": [0, 1, 2]},
    "last_row_4conn": {"method": "scr", "top_k": 3, "lam": 2.0, "connectivity": 4, "diag_rows": "last"},
}
#: Engine whose token budget is barely above the image: prompts are chunked and batches compete.
CHUNKED = dict(max_num_batched_tokens=80, enable_chunked_prefill=True)


def _traced(llm, cases):
    """Run ``cases`` as one batch; return the generations and the worker's SCR records (oldest first)."""
    llm.collective_rpc(scr_trace, args=(True,))
    gens = run_vllm(llm, cases)
    (log,) = llm.collective_rpc(scr_trace, args=(True,))
    return gens, list(log.values())


def _stats(llm, fixture):
    run_vllm(llm, [Case(fixture, None, max_tokens=1)])  # delivers the last finished ids to the worker
    (stats,) = llm.collective_rpc(worker_stats)
    return stats


pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def plain_5(paper_engine):
    """The plain request of the decision tests' case (image seed 5)."""
    fixture, llm = paper_engine
    return plain_answer(llm, fixture, 5)


@pytest.mark.parametrize("name", list(SPECS))
def test_decisions_match_reference(paper_engine, hf_model, plain_5, name):
    fixture, llm = paper_engine
    model, processor = hf_model
    spec = SPECS[name]
    case = method_case(fixture, 5, spec)
    (before,) = llm.collective_rpc(worker_stats)
    (gen,), log = _traced(llm, [case])
    (after,) = llm.collective_rpc(worker_stats)
    # alone in its batch, the diagnostic stopped after its last layer (the map below proves it exact)
    assert after["scr_early_exits"] > before["scr_early_exits"]
    assert len(log) == 1, "one diagnostic per SCR request"
    rec = log[0]

    refs = []
    forced = hf_generate(
        model, processor, case, force=gen.token_ids, context=recording_reference(model, spec, refs)
    )
    report = compare(gen, forced)  # the reference ran on the engine's tokens
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    # what the contract's engine = reference test checks on top (its [scr-preset] case is this
    # request: the V2 session of tests/test_engine_modes.py runs only this one)
    assert_free_greedy_agrees(forced, case)
    assert gen.token_ids != plain_5.token_ids or logprob_shift(gen, plain_5) > 1e-3

    # the engine's diagnostic map and selection are the reference's
    ref = refs[0].trace[0]
    assert tuple(rec["grid"]) == tuple(ref["grids"][0])
    assert torch.allclose(torch.tensor(rec["attn_map"]), ref["attn_map"][0].float(), atol=1e-6, rtol=1e-4)
    assert rec["sources"] == ref["sources"][0].tolist()
    assert rec["owner"] == ref["owner"][0].tolist()
    assert any(s >= 0 for s in rec["sources"]), "no source selected: the edit would not be exercised"


@pytest.mark.parametrize("noop", [{"top_k": 0}, {"lam": 1.0}, {"layers": []}])
def test_noop_configs_skip_the_diagnostic(paper_engine, noop):
    """(Their output equals the plain request's: the contract.)"""
    fixture, llm = paper_engine
    _, log = _traced(llm, [method_case(fixture, 9, {"method": "scr", **noop})])
    assert log == []


def test_chunked_prefill_keeps_the_image_in_one_chunk(engines, paper_engine):
    """A token budget just above the image: diagnostics are chunked (their sums span chunks) and the
    real prefills compete with other requests, so the scheduler must roll a chunk back before an image."""
    fixture, llm = paper_engine
    chunked = engines.get(fixture, **CHUNKED)
    story = "Tell me a long story about a red bus, a green tree and a small dog in the park today. " * 2
    specs = [None, "scr", None, SPECS["strong"], "kvsmooth", "scr"]
    cases = [
        method_case(fixture, 30 + i, s, "Describe the image.") if i % 2 else Case(fixture, None, story)
        for i, s in enumerate(specs)
    ]
    scheduler = chunked.llm_engine.engine_core.engine_core.scheduler
    rollbacks = scheduler.__dict__.setdefault("_halluguard_stats", {}).get("scr_chunk_rollbacks", 0)
    batch, log = _traced(chunked, cases)
    assert len(log) == 3
    rolled = scheduler.__dict__["_halluguard_stats"].get("scr_chunk_rollbacks", 0) - rollbacks
    for case, gen in zip(cases, batch, strict=True):
        (solo,) = run_vllm(llm, [case])  # the default engine: whole prompts in one step
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-4, f"{case.extra_args}: {report}"
    stats = _stats(chunked, fixture)
    assert stats["scr_edits"] >= 3 and stats["scr_split_images"] == 0, stats
    assert rolled > 0 or fixture == "qwen2_vl", "no chunk was rolled back: the guard was not exercised"


def test_preempted_scr_requests_recompute_with_their_selection(engines):
    """A KV cache of a few blocks forces recompute preemption; every output equals the same batch's
    on an engine with room (no preemption), which equals the solo runs (the contract's mixed batch)."""
    llm = engines.get("llava", max_model_len=256, kv_cache_memory_bytes=14 * 32 * 2048)
    cases = [method_case("llava", 60 + i, "scr" if i % 2 else None) for i in range(8)]
    outs = run_vllm(llm, cases)
    stats = _stats(llm, "llava")
    assert stats["preempted"] > 0, f"no preemption happened: {stats}"
    assert stats["active"] == 0 and stats["admitted"] == stats["released"], stats
    relaxed = run_vllm(engines.get("llava"), cases)
    for case, got, want in zip(cases, outs, relaxed, strict=True):
        assert got.token_ids == want.token_ids, case.extra_args


def test_prefix_cache_is_never_read_by_or_from_scr(paper_engine):
    fixture, llm = paper_engine
    llm.reset_prefix_cache()
    scr, plain = method_case(fixture, 40, "scr"), method_case(fixture, 40, None)

    def cached(case):
        out = llm.generate([vllm_inputs(_processor(fixture), case)], [sampling_params(case)], use_tqdm=False)
        return out[0].num_cached_tokens or 0, list(out[0].outputs[0].token_ids)

    first = cached(scr)
    assert first[0] == 0
    assert cached(plain)[0] == 0, "plain requests must not read the SCR passes' KV"
    assert cached(plain)[0] > 0
    again = cached(scr)
    assert again == (0, first[1]), "SCR requests never read the prefix cache (their image rows are edited)"


def _processor(fixture):
    from transformers import AutoProcessor

    from vllm_halluguard.tiny_models import ensure_fixture

    return AutoProcessor.from_pretrained(ensure_fixture(fixture))


def test_abort_while_the_diagnostic_runs_frees_both(paper_engine):
    fixture, llm = paper_engine
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    case = method_case(fixture, 50, "scr")
    engine.add_request("scr-abort", vllm_inputs(_processor(fixture), case), sampling_params(case))
    held = scheduler.__dict__["_halluguard_held"]
    assert len(held) == 1 and len(scheduler.requests) == 1, "the diagnostic runs, the real request waits"
    engine.abort_request(["scr-abort"])
    assert held == {} and all(r.is_finished() for r in scheduler.requests.values())
    for _ in range(10):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests()
    (ok,) = run_vllm(llm, [case])
    assert len(ok.token_ids) == 32


@pytest.mark.parametrize(("seed", "prompt"), [(None, "Tell me a story.")])
def test_text_only_request_is_refused(paper_engine, seed, prompt):
    fixture, llm = paper_engine
    with pytest.raises(VLLMValidationError, match="needs an image"):
        run_vllm(llm, [Case(fixture, seed, prompt, extra_args={EXTRA_ARGS_KEY: "scr"})])
    (ok,) = run_vllm(llm, [method_case(fixture, 3, "scr")])
    assert len(ok.token_ids) == 32


def _config(budget=512, pp=1, mode=0, cap=0):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=budget, long_prefill_token_threshold=cap),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=1),
        speculative_config=None,
        compilation_config=SimpleNamespace(mode=mode),
    )


def _image(offset, length):
    return SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=offset, length=length))


@pytest.mark.parametrize(
    ("features", "prompt_len", "config", "needle"),
    [
        ([], 20, _config(), "needs an image"),
        ([_image(2, 8), _image(12, 8)], 30, _config(), "one image per request, got 2"),
        ([_image(2, 8)], 10, _config(), "needs text after the image"),
        ([_image(2, 64)], 80, _config(budget=48), "64 tokens and max_num_batched_tokens is 48"),
        ([_image(2, 64)], 80, _config(cap=32), "64 tokens and long_prefill_token_threshold is 32"),
        ([_image(2, 8)], 20, _config(pp=2), "pipeline parallelism"),
        ([_image(2, 8)], 20, _config(mode=3), "--enforce-eager"),
    ],
)
def test_admission_checks(features, prompt_len, config, needle):
    from transformers import AutoConfig

    from vllm_halluguard.tiny_models import ensure_fixture

    cfg = resolve("scr", AutoConfig.from_pretrained(ensure_fixture("llava")))
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        check_inputs(cfg, features, prompt_len, config)
    check_inputs(cfg, [_image(2, 8)], 20, _config())  # the same request with valid settings passes
