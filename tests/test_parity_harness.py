"""The parity harness's derived free-greedy check: a teacher-forced run's per-step greedy choice is
what a free greedy run would emit, so ``assert_free_greedy_agrees`` can stand in for running it."""

import pytest

from helpers.parity import Case, assert_free_greedy_agrees, free_greedy_mismatch, hf_generate
from vllm_halluguard import reference
from vllm_halluguard.tiny_models import load_hf

STEPS = 12


@pytest.fixture(scope="module")
def llava():
    return load_hf("llava")


@pytest.mark.parametrize("spec", [None, "kvsmooth"])
def test_forced_runs_greedy_choices_are_the_free_run(llava, spec):
    model, processor = llava
    case = Case("llava", 3, max_tokens=STEPS)

    def ctx():
        return reference.apply(model, spec)

    free = hf_generate(model, processor, case, context=ctx)
    forced = hf_generate(model, processor, case, force=free.token_ids, context=ctx)
    assert free.greedy_token_ids is None
    assert forced.greedy_token_ids == free.token_ids
    assert free_greedy_mismatch(forced) is None
    assert_free_greedy_agrees(forced, case)


def test_a_forced_token_greedy_would_not_pick_is_reported(llava):
    model, processor = llava
    case = Case("llava", 3, max_tokens=STEPS)
    free = hf_generate(model, processor, case)
    tokens = list(free.token_ids)
    tokens[5] = (tokens[5] + 1) % model.config.get_text_config().vocab_size
    forced = hf_generate(model, processor, case, force=tokens)
    assert forced.token_ids == tokens
    assert free_greedy_mismatch(forced) == 5
    with pytest.raises(AssertionError, match="step 5"):
        assert_free_greedy_agrees(forced, case)


def test_a_shorter_forced_run_does_not_stand_in_for_the_free_run(llava):
    model, processor = llava
    case = Case("llava", 3, max_tokens=STEPS)
    free = hf_generate(model, processor, case)
    forced = hf_generate(model, processor, case, force=free.token_ids[:-1])
    assert free_greedy_mismatch(forced) is None
    with pytest.raises(AssertionError):
        assert_free_greedy_agrees(forced, case)
