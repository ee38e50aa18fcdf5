"""The VLMs served today (issue 19), lean: per architecture one shared engine, HF ≡ vLLM parity
(batch = solo), and every method equal to its dense reference inside one mixed batch, or refused
at admission where it does not apply."""

import pytest
from vllm.exceptions import VLLMValidationError

from helpers.method_cases import labelled
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
from vllm_halluguard.tiny_models import SERVED_FIXTURES, load_hf

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 1e-4  # plain parity (fp32)
METHOD_ATOL = 1e-3  # method parity, as in the engine suites of the paper fixtures
STEPS = 12
#: Every method (both served FarSight modes), with settings that act on a 4-layer model.
METHODS = labelled("served")
#: Methods refused on an architecture, with the phrase the admission error must contain.
REFUSED: dict[str, dict[str, str]] = {
    "llava_next": {"scr": "scr defines its neighbourhoods on one patch grid"},
    "llava_onevision": {"scr": "scr defines its neighbourhoods on one patch grid"},
}


def _case(fixture, seed, spec, prompt="Describe the image."):
    case = method_case(fixture, seed, spec, prompt)
    return Case(case.fixture, case.image_seed, case.prompt, STEPS, case.extra_args)


@pytest.fixture(scope="module", params=SERVED_FIXTURES)
def setup(request, engines):
    name = request.param
    return name, engines.get(name), load_hf(name)


def test_vllm_matches_hf_and_batch_matches_solo(setup):
    fixture, llm, (model, processor) = setup
    cases = [_case(fixture, 10, None), _case(fixture, 11, None, "Is it a dog?"), _case(fixture, None, None)]
    batch = run_vllm(llm, cases)
    assert len({tuple(g.token_ids) for g in batch}) == len(cases), "the requests should differ"
    for case, gen in zip(cases, batch, strict=True):
        (solo,) = run_vllm(llm, [case])
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"solo {case}: {report}"
        forced = hf_generate(model, processor, case, force=gen.token_ids)
        assert forced.prompt_token_ids == gen.prompt_token_ids
        report = compare(gen, forced)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"HF {case}: {report}"
        assert_free_greedy_agrees(forced, case)


def test_every_method_matches_its_reference_in_a_mixed_batch(setup):
    fixture, llm, (model, processor) = setup
    names = [m for m in METHODS if m not in REFUSED.get(fixture, {})]
    cases = [_case(fixture, 30 + i, METHODS[m]) for i, m in enumerate(names)]
    cases.insert(2, _case(fixture, 29, None))  # a plain row in the middle of the batch
    batch = run_vllm(llm, cases)
    for case, gen in zip(cases, batch, strict=True):
        spec = case.extra_args and next(iter(case.extra_args.values()))
        (solo,) = run_vllm(llm, [case])  # each row of the mixed batch is the request run alone
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"solo {spec}: {report}"
        if spec is None:
            continue
        refs: list = []
        ctx = recording_reference(model, spec, refs)
        forced = hf_generate(model, processor, case, force=gen.token_ids, context=ctx)
        report = compare(gen, forced)
        assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, f"{spec}: {report}"
        assert_free_greedy_agrees(forced, case)
        # the method acts: the plain model scores the same tokens differently
        plain = hf_generate(model, processor, case, force=gen.token_ids)
        assert logprob_shift(gen, plain) > 1e-3, f"{spec} left the log-probs unchanged"


def test_inapplicable_methods_are_refused_at_admission(setup):
    fixture, llm, _ = setup
    for method, needle in REFUSED.get(fixture, {}).items():
        with pytest.raises(VLLMValidationError, match=needle):
            run_vllm(llm, [_case(fixture, 1, METHODS[method])])
    (ok,) = run_vllm(llm, [_case(fixture, 1, "kvsmooth")])  # the engine keeps serving
    assert len(ok.token_ids) == STEPS
