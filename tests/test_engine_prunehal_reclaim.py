"""PruneHal's reclaiming variant in the engine: parity with the dense reference, fully pruned prompt
blocks back in vLLM's block pool during the request (pool counters, the scheduler's and the worker's
block lists), their reuse by other requests without changing any output, prefix-cache sharing and
preemption."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from transformers import AutoProcessor

from helpers.parity import (
    Generation,
    assert_free_greedy_agrees,
    compare,
    hf_generate,
    logprob_shift,
    method_case,
    recording_reference,
    run_vllm,
    sampling_params,
    vllm_inputs,
)
from vllm_halluguard.engine import reclaim
from vllm_halluguard.engine.prunehal import prunehal_trace
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.tiny_models import ensure_fixture

pytestmark = pytest.mark.engine

BLOCK = 32
IMAGE_ID = {"llava": 4, "qwen2_vl": 12}
METHOD_ATOL = 1e-3
#: The reclaiming variant: one block-granular selection for all layers, groups = the KV blocks.
RECLAIM = {
    "method": "prunehal",
    "r": 0.4,
    "t": 3,
    "selection": "shared",
    "granularity": "block",
    "block": BLOCK,
}
#: The same with a prune that keeps floor(0.3 * 3) = 0 of llava's 3 image groups: the whole image goes,
#: and with it the one 32-token block (positions 32..63) that holds only image tokens.
RECLAIM_ALL = {**RECLAIM, "r": 0.3, "t": 1}
SPECS = {
    "shared_block": RECLAIM,
    "shared_token": {"method": "prunehal", "r": 0.4, "t": 3, "selection": "shared"},
}
#: A small pool for the llava fixture (88-token prompts: 3 blocks, 4 with 32 generated tokens): 11
#: blocks (plus vLLM's null block), so requests compete for blocks and freed ones are reused.
SMALL = dict(num_gpu_blocks_override=12, max_model_len=128, max_num_seqs=4)


@pytest.fixture(scope="module")
def small(engines):
    """One llava engine with an 11-block pool, shared by this module."""
    llm = engines.get("llava", **SMALL)
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.block_size == BLOCK and cache.enable_prefix_caching
    return llm


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(ensure_fixture("llava"))


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def req_blocks(llm, req_id):
    """The scheduler's block list of a request (``KVCacheBlock`` objects, null blocks included)."""
    (manager,) = scheduler(llm).kv_cache_manager.coordinator.single_type_managers
    return list(manager.req_to_blocks.get(req_id, []))


def free_count(llm) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def expected_freed(prompt_ids, keep) -> list[int]:
    """Logical blocks of the prompt whose every position is an image token pruned in every layer."""
    ids = torch.tensor(prompt_ids)
    gone = torch.zeros(len(ids), dtype=torch.bool)
    gone[ids == IMAGE_ID["llava"]] = ~torch.as_tensor(keep).any(0)
    return [b for b in range(len(ids) // BLOCK) if bool(gone[b * BLOCK : (b + 1) * BLOCK].all())]


def worker_block_ids(worker, req_id):
    """Worker side (``collective_rpc``): the request's block ids as the model runner holds them."""
    state = worker.model_runner.requests.get(req_id)
    return None if state is None else list(state.block_ids[0])


class Driver:
    """Steps an in-process engine request by request, calling ``watch(step)`` after every step."""

    def __init__(self, llm, processor) -> None:
        self.llm, self.processor = llm, processor
        self.done: dict[str, Generation] = {}

    def add(self, req_id, case) -> None:
        self.llm.llm_engine.add_request(req_id, vllm_inputs(self.processor, case), sampling_params(case))

    def run(self, watch=None, arrivals=None) -> dict[str, Generation]:
        """Step until every request finished; ``arrivals[step]``: requests ``(id, case)`` added then."""
        engine, step, arrivals = self.llm.llm_engine, 0, dict(arrivals or {})
        while engine.has_unfinished_requests() or arrivals:
            for req_id, case in arrivals.pop(step, ()):
                self.add(req_id, case)
            for out in engine.step():
                if out.finished:
                    comp = out.outputs[0]
                    steps = [{t: lp.logprob for t, lp in s.items()} for s in comp.logprobs or []]
                    self.done[out.request_id] = Generation(list(comp.token_ids), steps, out.prompt_token_ids)
            step += 1
            if watch is not None:
                watch(step)
        return self.done


def core_id(llm, req_id):
    """The engine core's id of a request added as ``req_id`` (vLLM may add a suffix)."""
    ids = [rid for rid in scheduler(llm).requests if rid == req_id or rid.startswith(f"{req_id}-")]
    return ids[0] if ids else None


def assert_same(gen, other, atol) -> None:
    """Same tokens, and log-probs within ``atol`` on the top-k tokens both runs report."""
    assert gen.token_ids == other.token_ids
    assert logprob_shift(gen, other) < atol


def same_as_solo(llm, processor, case, gen, atol=1e-5) -> None:
    (solo,) = run_vllm(llm, [case], processor)
    assert_same(gen, solo, atol)


def test_report_travels_with_a_pickled_model_runner_output():
    """Multi-process executors pickle the runner's output to the engine core (shared-memory queue):
    the report attribute travels with it (a plain dataclass ``__dict__`` entry)."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    setattr(out, reclaim.FIELD, {"a": (1, [1, 2])})
    back = pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    assert getattr(back, reclaim.FIELD) == {"a": (1, [1, 2])} and back.req_ids == ["a"]


def test_contiguous_runs_of_blocks():
    assert reclaim.runs([5, 1, 2, 3, 7, 6, 2]) == [(1, 4), (5, 8)]
    assert reclaim.runs([]) == []


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(SPECS))
def test_variant_matches_reference(paper_engine, hf_model, name):
    """Engine = dense reference (tokens, log-probs, every prune's keep masks) for the variant; on llava
    the blocks it frees are those the keep masks leave unread."""
    fixture, llm = paper_engine
    model, processor = hf_model
    spec = SPECS[name]
    case = method_case(fixture, 5, spec)
    llm.collective_rpc(prunehal_trace, args=(True,))
    (gen,) = run_vllm(llm, [case])
    ((rec,),) = [list(log.values()) for log in llm.collective_rpc(prunehal_trace, args=(True,))]

    refs: list = []
    forced = hf_generate(
        model, processor, case, force=gen.token_ids, context=recording_reference(model, spec, refs)
    )
    report = compare(gen, forced)
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    assert_free_greedy_agrees(forced, case)

    ref_prunes = [(r["step"], r["keep"][0]) for r in refs[0].trace if bool(r["fired"][0])]
    assert ref_prunes and [p["step"] for p in rec["prunes"]] == [s for s, _ in ref_prunes]
    for got, (_, keep) in zip(rec["prunes"], ref_prunes, strict=True):
        assert torch.equal(torch.tensor(got["keep"]), keep)
        assert bool((keep == keep[:1]).all())  # one selection for all layers
        if spec.get("granularity") == "block":  # whole groups: a group is kept entirely or not at all
            vis = torch.nonzero(torch.tensor(gen.prompt_token_ids) == IMAGE_ID[fixture]).flatten()
            for g in set((vis // BLOCK).tolist()):
                assert len(set(keep[0][vis // BLOCK == g].tolist())) == 1
    if fixture == "llava":
        freed = expected_freed(gen.prompt_token_ids, rec["prunes"][-1]["keep"])
        assert rec["reclaimable_blocks"] == len(freed)
        assert rec["freed_blocks"] == len(freed)


# ---------------------------------------------------------------------------------------- reclaim


def test_freed_blocks_return_to_the_pool_and_are_reused(small, processor):
    """After the forced prune (step 2) the image block is null in the scheduler's and the worker's
    block lists and back in the pool; plain requests arriving then get it, and every output equals the
    request's solo run (the reclaiming request reads the null block, not the new owner's K/V)."""
    llm = small
    drv = Driver(llm, processor)
    case = method_case("llava", 5, RECLAIM_ALL)
    # three short plain requests (3 blocks each, 92 tokens): they need the 9 free blocks, the freed
    # image block (at the tail of the free queue) included
    plains = [dataclasses.replace(method_case("llava", 30 + i, None), max_tokens=4) for i in range(3)]
    before = reclaim.scheduler_stats(llm.llm_engine.engine_core.engine_core)
    seen: dict = {"free": [], "blocks": [], "owners": []}
    physical: dict = {}

    def watch(step):
        rid = core_id(llm, "rc")
        blocks = req_blocks(llm, rid) if rid else []
        seen["free"].append(free_count(llm))
        seen["blocks"].append([None if b.is_null else b.block_id for b in blocks])
        if step == 1:
            physical["image"] = blocks[1].block_id
        if step == 3:  # after the prune at step 2 was reported and freed
            physical["worker"] = llm.collective_rpc(worker_block_ids, args=(rid,))[0]
        owners = [
            other for other in scheduler(llm).requests if other != rid
            and physical.get("image") in [b.block_id for b in req_blocks(llm, other)]
        ]  # fmt: skip
        seen["owners"].append(owners)

    drv.add("rc", case)
    arrivals = {3: [(f"p{i}", c) for i, c in enumerate(plains)]}
    done = drv.run(watch, arrivals)

    # step 1 = prefill (3 blocks), step 2 = first decode: the forced prune; its report frees block 1
    assert seen["blocks"][0] == [seen["blocks"][0][0], physical["image"], seen["blocks"][0][2]]
    assert seen["blocks"][1][1] is None and None not in seen["blocks"][0]
    assert seen["free"][1] == seen["free"][0] + 1  # no new block at step 2 (token 90 is in block 2)
    worker = physical["worker"]
    assert worker[1] == 0 and worker[0] == seen["blocks"][2][0] and worker[2] == seen["blocks"][2][2]
    assert any(seen["owners"]), "the freed block was never given to another request"
    after = reclaim.scheduler_stats(llm.llm_engine.engine_core.engine_core)
    assert after["prunehal_freed_blocks"] - before["prunehal_freed_blocks"] == 1
    assert after["prunehal_reclaiming_requests"] - before["prunehal_reclaiming_requests"] == 1

    same_as_solo(llm, processor, case, done["rc"])
    for i, plain in enumerate(plains):
        same_as_solo(llm, processor, plain, done[f"p{i}"])
    assert free_count(llm) == scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1  # all back
    (stats,) = llm.collective_rpc(worker_stats)
    assert stats["prunehal_freed_blocks"] >= 1 and stats["prunehal_reclaiming_requests"] >= 1
    assert llm.collective_rpc("halluguard_worker_stats") == [stats]  # by name, as the server asks


def test_prefix_cache_shared_block_is_kept_for_the_other_holder(small, processor):
    """Two identical reclaiming requests share the image block through the prefix cache: the first
    prune only drops one reference (the block stays allocated for the other); the second frees it.
    Both outputs equal the solo run."""
    llm = small
    drv = Driver(llm, processor)
    case = method_case("llava", 6, RECLAIM_ALL)
    refs: list = []

    def watch(step):
        a, b = core_id(llm, "a"), core_id(llm, "b")
        blocks_a = req_blocks(llm, a) if a else []
        blocks_b = req_blocks(llm, b) if b else []
        if step == 1:
            refs.append(blocks_a[1])
        image = refs[0]
        refs.append((step, image.ref_cnt, [x is image for x in blocks_a], [x is image for x in blocks_b]))

    drv.add("a", case)
    done = drv.run(watch, {1: [("b", case)]})  # b arrives one step later: a prefix-cache hit
    image = refs[0]
    by_step = {s: (cnt, in_a, in_b) for s, cnt, in_a, in_b in refs[1:]}
    assert by_step[1][0] == 1 and by_step[1][1][1]
    # step 2: b's prefill hits a's image block in the prefix cache, then a's prune drops a's reference
    assert by_step[2][0] == 1 and not by_step[2][1][1] and by_step[2][2][1]
    assert by_step[3][0] == 0 and not any(by_step[3][2])  # b's prune: back in the pool
    assert image.block_hash is not None  # still cached: its K/V are the prompt's, unchanged
    assert done["a"].token_ids == done["b"].token_ids
    same_as_solo(llm, processor, case, done["a"])
    same_as_solo(llm, processor, case, done["b"])
    assert free_count(llm) == scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1


# ------------------------------------------------------------------------------------- preemption

#: Prompts of 95 and 94 tokens: their first generated block is needed at engine steps 3 and 4.
PROMPT_95, PROMPT_94 = "Describe the image red blue.", "Describe the image of blue."


def test_preempted_pruned_request_resumes_with_its_masks(engines, processor):
    """A reclaiming request preempted after its prune replays its steps (the prompt unmasked, then one
    generated token per step under the prunes before it): its tokens, log-probs and prunes equal its
    solo run, and it frees its image block again at its prune step.

    12 blocks: p1 (95 tokens), p2, p3 (88) and r (94, last) take all 12. r's prune frees one block
    (step 2), p1 takes it for position 96 (step 3); at step 4 r needs a block, none is free and r is
    the last running request: vLLM preempts it. It resumes when p1 finishes: its 94-token prompt, then
    its 3 generated tokens one per step.
    """
    llm = engines.get("llava", **{**SMALL, "num_gpu_blocks_override": 13})
    drv = Driver(llm, processor)
    case = method_case("llava", 8, RECLAIM_ALL, PROMPT_94)
    plains = [
        method_case("llava", 40, None, PROMPT_95),
        method_case("llava", 41, None),
        method_case("llava", 42, None),
    ]
    core = llm.llm_engine.engine_core.engine_core
    before = reclaim.scheduler_stats(core)
    (stats0,) = llm.collective_rpc(worker_stats)
    llm.collective_rpc(prunehal_trace, args=(True,))
    preemptions: dict[str, int] = {}

    def watch(step):
        for req in scheduler(llm).requests.values():
            preemptions[req.request_id] = req.num_preemptions

    for i, plain in enumerate(plains):
        drv.add(f"p{i}", plain)
    drv.add("r", case)
    done = drv.run(watch)
    ((rec,),) = [list(log.values()) for log in llm.collective_rpc(prunehal_trace, args=(True,))]
    rid = next(r for r in preemptions if r == "r" or r.startswith("r-"))
    assert preemptions[rid] == 1 and rec.get("resumed") == 1, (preemptions, rec.get("resumed"))
    (stats1,) = llm.collective_rpc(worker_stats)
    assert stats1["preempted"] - stats0["preempted"] == 1
    after = reclaim.scheduler_stats(core)
    assert after["prunehal_freed_blocks"] - before["prunehal_freed_blocks"] == 2  # once per admission

    llm.collective_rpc(prunehal_trace, args=(True,))
    (solo,) = run_vllm(llm, [case], processor)
    ((solo_rec,),) = [list(log.values()) for log in llm.collective_rpc(prunehal_trace, args=(True,))]
    assert_same(done["r"], solo, 1e-4)
    assert [(p["step"], p["keep"]) for p in rec["prunes"]] == [
        (p["step"], p["keep"]) for p in solo_rec["prunes"]
    ]
    for i, plain in enumerate(plains):
        same_as_solo(llm, processor, plain, done[f"p{i}"])
    assert free_count(llm) == scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1
