"""Methods on a compiled model (no ``--enforce-eager``): vLLM's CPU build then traces the language
model once with Dynamo and compiles it with Inductor; attention stays an opaque custom op, inside which
the plugin's backends run. KVSmooth, FarSight (both served modes) and PruneHal must still equal their
dense references; SCR, whose edit wraps decoder layers that the compiled graph no longer calls, is
refused at admission."""

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
from vllm_halluguard.tiny_models import FIXTURES

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 1e-4  # plain parity (fp32), as in the other engine suites
METHOD_ATOL = 1e-3  # method parity, as in the other engine suites
STEPS = 12
#: Every method that runs compiled (not the ``eager_only`` ones), with settings that act on 4 layers.
METHODS = labelled("served", eager=False)


def _case(fixture, seed, spec, prompt="Describe the image."):
    case = method_case(fixture, seed, spec, prompt)
    return Case(case.fixture, case.image_seed, case.prompt, STEPS, case.extra_args)


def _count_layer_calls(worker, arm):
    """Wrap (``arm``) or unwrap a decoder layer's ``forward`` with a call counter; return the count."""
    runner = worker.model_runner
    kv_layers = {id(a) for a in runner.vllm_config.compilation_config.static_forward_context.values()}
    layer = next(  # a decoder layer (the vision tower's layers have a self_attn.attn too, and run eager)
        m
        for m in runner.get_model().modules()
        if id(getattr(getattr(m, "self_attn", None), "attn", None)) in kv_layers
    )
    if arm:
        original = layer.forward
        calls = [0]

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        layer.forward = counted
        layer._hg_test_calls = calls
        return 0
    calls = layer.__dict__.pop("_hg_test_calls")
    del layer.forward
    return calls[0]


@pytest.fixture(scope="module", params=FIXTURES)
def setup(request, engines, hf_models):
    name = request.param
    return name, engines.get(name, enforce_eager=False), hf_models.get(name)


def test_the_model_runs_compiled(setup):
    """The engine really runs the compiled graph: a Python wrapper put on a decoder layer after
    the model was traced is never called (an eager engine would call it once per step)."""
    fixture, llm, _ = setup
    assert int(llm.llm_engine.vllm_config.compilation_config.mode) != 0
    llm.collective_rpc(_count_layer_calls, args=(True,))
    try:
        run_vllm(llm, [_case(fixture, 1, "kvsmooth"), _case(fixture, 2, None)])
    finally:
        (calls,) = llm.collective_rpc(_count_layer_calls, args=(False,))
    assert calls == 0


def test_methods_match_their_references_in_a_mixed_batch(setup):
    fixture, llm, (model, processor) = setup
    cases = [_case(fixture, 40 + i, spec) for i, spec in enumerate(METHODS.values())]
    cases.insert(2, _case(fixture, 39, None))  # a plain row in the middle of the batch
    batch = run_vllm(llm, cases)
    for case, gen in zip(cases, batch, strict=True):
        spec = case.extra_args and next(iter(case.extra_args.values()))
        (solo,) = run_vllm(llm, [case])
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"solo {spec}: {report}"
        if spec is None:
            report = compare(gen, hf_generate(model, processor, case, force=gen.token_ids))
            assert report.same_tokens and report.max_abs_logprob_diff < LOGPROB_ATOL, f"plain: {report}"
            continue
        ctx = recording_reference(model, spec, [])
        forced = hf_generate(model, processor, case, force=gen.token_ids, context=ctx)
        report = compare(gen, forced)
        assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, f"{spec}: {report}"
        assert_free_greedy_agrees(forced, case)
        plain = hf_generate(model, processor, case, force=gen.token_ids)
        assert logprob_shift(gen, plain) > 1e-3, f"{spec} left the log-probs unchanged"


def test_scr_is_refused_on_a_compiled_model(setup):
    fixture, llm, _ = setup
    with pytest.raises(VLLMValidationError, match="--enforce-eager"):
        run_vllm(llm, [_case(fixture, 1, "scr")])
    (ok,) = run_vllm(llm, [_case(fixture, 1, "prunehal")])  # the engine keeps serving
    assert len(ok.token_ids) == STEPS
