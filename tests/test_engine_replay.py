"""The scheduler's replay of a preempted request's decode steps (engine/replay.py), without an engine:
which methods replay, how a resumed request's tokens are cut into steps, and its prefix-cache limit.
The engine test is tests/test_engine_methods.py::test_preempted_requests_recompute_exactly."""

from types import SimpleNamespace

import pytest

from vllm_halluguard.engine.replay import breaks_replay, cache_hit_limit, replay_tokens, replays


def _request(spec):
    import json

    extra = None if spec is None else {"halluguard": json.dumps(spec) if not isinstance(spec, str) else spec}
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, False),
        ("farsight", False),
        ("scr", False),
        (["scr", "farsight"], False),
        ("kvsmooth", True),
        ("prunehal", True),
        (["scr", "prunehal"], True),
        (["kvsmooth", "farsight"], True),
    ],
)
def test_methods_with_decode_state_replay(spec, expected):
    assert replays(_request(spec)) is expected


def test_a_resumed_request_runs_its_prompt_then_one_generated_token_per_step():
    """Prompt of 10 tokens and 4 generated (positions 10..13); a budget of 100 tokens per step."""
    prompt, total, budget = 10, 14, 100
    steps, computed = [], 0
    while computed < total:
        n = replay_tokens(prompt, total, computed, min(budget, total - computed))  # vLLM's offer
        steps.append(n)
        computed += n
    assert steps == [10, 1, 1, 1, 1]
    assert replay_tokens(prompt, total, 4, 3) == 3, "a smaller chunk of the prompt stays as it is"
    assert replay_tokens(prompt, total, 4, 100) == 6, "a chunk of the prompt stops at its end"


def test_first_prefill_and_decode_are_untouched():
    assert replay_tokens(10, 10, 0, 10) == 10  # first admission: the prompt only
    assert replay_tokens(10, 10, 4, 6) == 6
    assert replay_tokens(10, 14, 13, 1) == 1  # decoding the last known token


def test_a_chunk_over_generated_tokens_breaks_the_replay():
    assert breaks_replay(10, 14, 0, 14)  # vLLM's ordinary recompute: prompt and outputs at once
    assert breaks_replay(10, 14, 8, 3)  # across the prompt's end
    assert breaks_replay(10, 14, 11, 2)
    assert not breaks_replay(10, 14, 0, 10)
    assert not breaks_replay(10, 14, 11, 1)
    assert not breaks_replay(10, 10, 0, 10)


def test_prefix_cache_reads_end_before_the_prompts_last_token():
    # what vLLM lets a first admission read: whole blocks, at most prompt_len - 1 tokens
    assert cache_hit_limit(88, 32) == 64
    assert cache_hit_limit(97, 32) == 96
    assert cache_hit_limit(96, 32) == 64
    assert cache_hit_limit(20, 32) == 0
