"""In-engine PruneHal beyond the per-method contract (tests/test_engine_contract.py): its decisions are the
reference's (prune steps and the keep masks of every prune), the prefill as step 1 (also when chunked),
the block view and refused text-only requests."""

import math

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
)
from vllm_halluguard.engine.prunehal import prunehal_trace
from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY
from vllm_halluguard.engine.runtime import worker_stats

pytestmark = pytest.mark.engine

METHOD_ATOL = 1e-3
BLOCK = 32
#: A token budget below the prompt: the prefill is chunked and step 1 is the last chunk's last row.
CHUNKED = dict(max_num_batched_tokens=80, enable_chunked_prefill=True)
#: A prompt long enough to be chunked on both fixtures (the image alone fits one chunk).
LONG_PROMPT = "Describe the image in detail, naming every object, its colour and where it lies. " * 4
SPECS = {
    "preset": "prunehal",
    "subset_first_step": {"method": "prunehal", "r": 0.5, "t": 5, "history": "first_step", "layers": [1, 2]},
    "vote_only": {"method": "prunehal", "r": 0.6, "t": 3, "force_step": None, "statistic": "mass"},
}


def _run_traced(llm, case):
    """One request through the engine and its PruneHal record from the worker."""
    llm.collective_rpc(prunehal_trace, args=(True,))
    (gen,) = run_vllm(llm, [case])
    (log,) = llm.collective_rpc(prunehal_trace, args=(True,))
    assert len(log) == 1, log.keys()
    return gen, next(iter(log.values()))


@pytest.mark.parametrize("name", list(SPECS))
def test_decisions_match_reference(paper_engine, hf_model, name):
    fixture, llm = paper_engine
    model, processor = hf_model
    spec = SPECS[name]
    case = method_case(fixture, 5, spec)
    gen, rec = _run_traced(llm, case)
    plain = plain_answer(llm, fixture, 5)

    refs = []
    ctx = recording_reference(model, spec, refs)
    forced = hf_generate(model, processor, case, force=gen.token_ids, context=ctx)
    report = compare(gen, forced)  # the reference ran on the engine's tokens
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    # what the contract's engine = reference test checks on top (its [prunehal-preset] case is this
    # request: the V2 session of tests/test_engine_modes.py runs only this one)
    assert_free_greedy_agrees(forced, case)
    assert gen.token_ids != plain.token_ids or logprob_shift(gen, plain) > 1e-3

    # the engine's decisions are the reference's: same steps, same per-layer keep masks
    trace = refs[0].trace
    assert rec["num_visual"] == trace[0]["keep"].shape[-1] > 0
    assert rec["steps"] == trace[-1]["step"] == len(gen.token_ids)  # step 1 is the prefill
    ref_prunes = [(r["step"], r["keep"][0]) for r in trace if bool(r["fired"][0])]
    assert [p["step"] for p in rec["prunes"]] == [s for s, _ in ref_prunes]
    for got, (_, keep) in zip(rec["prunes"], ref_prunes, strict=True):
        assert torch.equal(torch.tensor(got["keep"]), keep)
        assert got["kept"] == keep.sum(-1).tolist()
    assert ref_prunes, "no prune happened: the test would not exercise masking"

    # floor schedule: each prune keeps floor(r * |S|) of the layer's kept tokens
    r = {"preset": {"llava": 0.4, "qwen2_vl": 0.9}[fixture]}.get(name) or spec["r"]
    n = rec["num_visual"]
    for p in rec["prunes"]:
        n = math.floor(n * r + 1e-9)
        assert set(p["kept"]) == {n}, (p["step"], p["kept"], n)

    # tokens produced before the first prune takes effect are the plain run's, bit for bit: step m
    # produces token m and its decision applies from step m + 1 (the forced prune: tokens 1-2)
    first_effect = ref_prunes[0][0]
    if spec == "prunehal" or spec.get("force_step", 2) == 2:
        assert first_effect == 2  # the first decode forward
    assert gen.logprobs[:first_effect] == plain.logprobs[:first_effect]


def test_chunked_prefill_measures_the_last_chunk_as_step_1(engines, paper_engine):
    """With the prompt split over chunks, only the last chunk's last row is step 1: the decisions (prune
    steps and keep masks) and the tokens equal those of the unchunked engine."""
    fixture, llm = paper_engine
    chunked = engines.get(fixture, **CHUNKED)
    case = method_case(fixture, 5, "prunehal", LONG_PROMPT)
    gen, rec = _run_traced(llm, case)
    gen_c, rec_c = _run_traced(chunked, case)
    assert len(gen.prompt_token_ids) > CHUNKED["max_num_batched_tokens"]  # really chunked
    assert rec_c["prunes"] and rec_c["prunes"][0]["step"] == 2
    assert rec_c == rec
    report = compare(gen_c, gen)
    assert report.same_tokens and report.max_abs_logprob_diff < 1e-4, report


def test_block_view_counts_blocks_pruned_in_every_layer(paper_engine):
    fixture, llm = paper_engine
    assert llm.llm_engine.vllm_config.cache_config.block_size == BLOCK  # conftest's shared engines
    spec = {"method": "prunehal", "r": 0.01, "t": 1}  # the forced prune drops every visual token
    gen, rec = _run_traced(llm, method_case(fixture, 7, spec))
    image_id = {"llava": 4, "qwen2_vl": 12}[fixture]
    visual = torch.tensor(gen.prompt_token_ids) == image_id
    assert int(visual.sum()) == rec["num_visual"]
    keep = torch.tensor(rec["prunes"][-1]["keep"])  # [layers, Nv], all decoder layers
    gone = torch.zeros(len(gen.prompt_token_ids), dtype=torch.bool)
    gone[visual] = ~keep.any(0)
    blocks = [bool(gone[i : i + BLOCK].all()) and i + BLOCK <= len(gone) for i in range(0, len(gone), BLOCK)]
    assert rec["reclaimable_blocks"] == sum(blocks)
    assert not keep.any()
    if fixture == "llava":  # 64 consecutive image tokens cover at least one whole 32-token block
        assert rec["reclaimable_blocks"] >= 1
    stats = worker_stats_of(llm, fixture)
    assert stats["prunehal_reclaimable_blocks"] == 0 and stats["active"] == 0, stats


def test_text_only_request_is_refused_and_others_are_unaffected(paper_engine):
    """PruneHal acts on image tokens: a request without an image is refused at admission."""
    fixture, llm = paper_engine
    with pytest.raises(VLLMValidationError, match="needs an image"):
        run_vllm(llm, [Case(fixture, None, "Tell me a story.", extra_args={EXTRA_ARGS_KEY: "prunehal"})])
    (ok,) = run_vllm(llm, [method_case(fixture, 3, "prunehal")])
    assert len(ok.token_ids) == 32


def worker_stats_of(llm, fixture):
    """Runtime counters, after one plain step delivers the last finished request ids to the worker."""
    run_vllm(llm, [Case(fixture, None, max_tokens=1)])
    (stats,) = llm.collective_rpc(worker_stats)
    return stats
