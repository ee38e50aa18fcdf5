"""The parity harness for tests: it lives in the package (:mod:`vllm_halluguard.parity`), where
``halluguard-check`` uses the same comparison; this module keeps the tests' import path, plus
:func:`plain_answer`, the tests' shared plain baseline."""

from typing import Any

from vllm_halluguard.parity import (
    DEFAULT_PROMPT,
    ENGINE_DEFAULTS,
    Case,
    Generation,
    ParityReport,
    assert_free_greedy_agrees,
    check_fixture,
    compare,
    engine,
    free_greedy_mismatch,
    hf_generate,
    hf_inputs,
    logprob_shift,
    make_llm,
    method_case,
    prompt_text,
    recording_reference,
    run_vllm,
    sampling_params,
    shutdown_llm,
    vllm_inputs,
)

#: (engine id, fixture, image seed) -> the plain answer (the session's engines live until its end).
_PLAIN: dict[tuple[int, str, int], Generation] = {}


def plain_answer(llm: Any, fixture: str, seed: int) -> Generation:
    """The plain request ``method_case(fixture, seed, None)`` run alone on ``llm``, once per engine: the
    baseline several suites compare a method's output with ("the method changes the output"). A solo
    run of the same request on the same engine gives the same answer each time."""
    key = (id(llm), fixture, seed)
    if key not in _PLAIN:
        (_PLAIN[key],) = run_vllm(llm, [method_case(fixture, seed, None)])  # type: ignore[arg-type]
    return _PLAIN[key]


__all__ = [
    "DEFAULT_PROMPT",
    "ENGINE_DEFAULTS",
    "Case",
    "Generation",
    "ParityReport",
    "assert_free_greedy_agrees",
    "check_fixture",
    "compare",
    "engine",
    "free_greedy_mismatch",
    "hf_generate",
    "hf_inputs",
    "logprob_shift",
    "make_llm",
    "method_case",
    "plain_answer",
    "prompt_text",
    "recording_reference",
    "run_vllm",
    "sampling_params",
    "shutdown_llm",
    "vllm_inputs",
]
