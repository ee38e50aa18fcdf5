"""Baseline parity: vLLM (CPU, fp32, greedy) and HF transformers agree on both tiny architectures."""

import pytest

from helpers.parity import Case, assert_free_greedy_agrees, compare, hf_generate, run_vllm
from vllm_halluguard.tiny_models import FIXTURES

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 1e-4
PROMPTS = ["Describe the image.", "What color is the square?", "How many cats are there?", "Is it a dog?"]


def _cases(name):
    return [Case(name, image_seed=10 + i, prompt=p) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module", params=FIXTURES)
def runs(request):
    """Per architecture: the 4 cases in one vLLM batch, the same 4 solo, and the HF model."""
    name = request.param
    cases = _cases(name)
    llm = request.getfixturevalue("engines").get(name)
    batch = run_vllm(llm, cases)
    solo = [run_vllm(llm, [c])[0] for c in cases]
    model, processor = request.getfixturevalue("hf_models").get(name)
    return cases, batch, solo, model, processor


def test_same_prompt_tokens(runs):
    cases, batch, _, model, processor = runs
    for case, gen in zip(cases, batch, strict=True):
        ref = hf_generate(model, processor, case, force=gen.token_ids[:1])
        assert gen.prompt_token_ids == ref.prompt_token_ids


def test_vllm_matches_hf_greedy_and_teacher_forced_logprobs(runs):
    cases, batch, _, model, processor = runs
    for case, gen in zip(cases, batch, strict=True):
        assert len(gen.token_ids) == case.max_tokens == len(gen.logprobs)
        assert all(len(step) >= 5 for step in gen.logprobs)
        forced = hf_generate(model, processor, case, force=gen.token_ids)
        report = compare(gen, forced)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"{case}: {report}"
        assert_free_greedy_agrees(forced, case)


def test_batch_of_four_matches_solo_runs(runs):
    cases, batch, solo, *_ = runs
    assert len({tuple(g.token_ids) for g in batch}) > 1, "the 4 requests should differ"
    for case, b, s in zip(cases, batch, solo, strict=True):
        report = compare(b, s)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"{case}: {report}"
