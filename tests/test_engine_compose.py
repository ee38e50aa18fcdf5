"""Composed methods in the engine: every pair and one triple equal the dense reference composed the
same way (tokens and log-probs) on both tiny fixtures, and mixed batches of compositions, single
methods and plain rows equal solo runs. Refused settings are in tests/test_methods_compose.py."""

import pytest

from helpers.method_cases import COMPOSITIONS, labelled
from helpers.parity import (
    Case,
    assert_free_greedy_agrees,
    compare,
    hf_generate,
    logprob_shift,
    method_case,
    run_vllm,
)
from vllm_halluguard import reference
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.kernels import cpu_native

pytestmark = pytest.mark.engine

METHOD_ATOL = 1e-3  # the single-method parity bound
#: The member configs and the compositions of tests/helpers/method_cases.py.
MEMBERS = labelled("members")
FS_B, FS_C, PRUNE = (MEMBERS[label] for label in ("farsight_b", "farsight_c", "prunehal"))
SPECS = COMPOSITIONS


#: Compositions whose decode steps need nothing from attention (SCR's real request, FarSight mode C):
#: those steps get vLLM's own metadata and no route.
NO_DECODE_ROUTE = {"scr+farsight_c"}


def _matches_reference(paper_engine, hf_model, spec) -> tuple:
    """The composition's generation (= the composed reference, tokens and log-probs) and how many of its
    steps kept the members' own routes (``compose_member_routes``)."""
    fixture, llm = paper_engine
    model, processor = hf_model
    case = method_case(fixture, 5, spec)
    (before,) = llm.collective_rpc(worker_stats)
    (gen,) = run_vllm(llm, [case])
    (after,) = llm.collective_rpc(worker_stats)

    def ctx():
        return reference.apply(model, spec)

    forced = hf_generate(model, processor, case, force=gen.token_ids, context=ctx)
    report = compare(gen, forced)
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    assert_free_greedy_agrees(forced, case)
    return gen, after["compose_member_routes"] - before["compose_member_routes"]


@pytest.mark.parametrize("name", list(SPECS))
def test_engine_matches_composed_reference(paper_engine, hf_model, name):
    """On the native CPU kernels, where every decode step keeps the members' own routes (the reworking
    member takes the sink lane's sinks, the measuring one its key mask: engine/compose.py)."""
    fixture, llm = paper_engine
    spec = SPECS[name]
    gen, own_routes = _matches_reference(paper_engine, hf_model, spec)
    assert own_routes >= (0 if name in NO_DECODE_ROUTE else len(gen.token_ids) - 1), own_routes
    # every member acts: the composition differs from each of its members alone
    for member in spec:
        (alone,) = run_vllm(llm, [method_case(fixture, 5, member)])
        assert gen.token_ids != alone.token_ids or logprob_shift(gen, alone) > 1e-4, member


@pytest.mark.parametrize("name", ["kvsmooth+prunehal", "triple"])
def test_kernel_protocol_in_torch_matches_composed_reference(paper_engine, hf_model, name, monkeypatch):
    """Without the native CPU kernels (``HALLUGUARD_CPU_NATIVE=0``; so too on more than one rank) the
    reworked rows take the kernel protocol in torch: one attention with every member's terms, then each
    member's ``after_kernel``."""
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    _, own_routes = _matches_reference(paper_engine, hf_model, SPECS[name])
    assert own_routes == 0


def test_mixed_batch_equals_solo_runs(paper_engine):
    """Compositions, their members alone and plain rows in one batch (SCR's diagnostic included; two
    PruneHal configs under FarSight mode B's sinks, which PruneHal's torch path takes without a group)."""
    fixture, llm = paper_engine
    specs = [
        [FS_B, {**PRUNE, "r": 0.4}],
        None,
        SPECS["triple"],
        "kvsmooth",
        SPECS["farsight_b+prunehal"],
        None,
        FS_B,
        SPECS["scr+kvsmooth"],
        PRUNE,
        SPECS["farsight_c+kvsmooth"],
    ]
    cases = [method_case(fixture, 30 + i, s) for i, s in enumerate(specs)]
    batch = run_vllm(llm, cases)
    for case, gen in zip(cases, batch, strict=True):
        (solo,) = run_vllm(llm, [case])
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-5, f"{case.extra_args}: {report}"
    run_vllm(llm, [Case(fixture, None, max_tokens=1)])  # delivers the last finished ids to the worker
    (stats,) = llm.collective_rpc(worker_stats)
    assert stats["active"] == 0 and stats["admitted"] == stats["released"], stats


def _cached_tokens(llm, case) -> int:
    from transformers import AutoProcessor

    from helpers.parity import sampling_params, vllm_inputs
    from vllm_halluguard.tiny_models import ensure_fixture

    short = Case(case.fixture, case.image_seed, case.prompt, 4, case.extra_args)
    inputs = vllm_inputs(AutoProcessor.from_pretrained(ensure_fixture(case.fixture)), short)
    out = llm.generate([inputs], [sampling_params(short)], use_tqdm=False)[0]
    return out.num_cached_tokens or 0


def test_prefix_cache_salt_covers_compositions(paper_engine):
    fixture, llm = paper_engine
    llm.reset_prefix_cache()
    composed = method_case(fixture, 41, ["kvsmooth", FS_B])
    assert _cached_tokens(llm, method_case(fixture, 41, None)) == 0
    assert _cached_tokens(llm, method_case(fixture, 41, "kvsmooth")) == 0
    assert _cached_tokens(llm, composed) == 0, "a composition must not reuse plain or single-method KV"
    assert _cached_tokens(llm, composed) > 0, "the same composition shares"
    assert _cached_tokens(llm, method_case(fixture, 41, [FS_B, "kvsmooth"])) > 0, "written in another order"
    assert _cached_tokens(llm, method_case(fixture, 41, [FS_C, "kvsmooth"])) == 0, "another member config"
