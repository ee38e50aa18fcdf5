"""SCR under load at LLaVA-1.5's geometry: 576 image tokens (24x24 patches) and a token budget of 576.

Plain requests decode while an SCR request arrives, so every step has less room than the image. The
scheduler must keep the image of both SCR passes in one chunk (the request waits, then goes first),
and the request must come back edited, equal to the dense reference; when the guard is switched off
the cut request must fail with an error rather than answer unedited.
"""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers.parity import (
    Case,
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
from vllm_halluguard.engine import two_pass
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.tiny_models import build_llava_geometry

pytestmark = pytest.mark.engine

IMAGE_PX = 336  # 24 x 24 patches of 14 px
IMAGE_TOKENS = 576
BUDGET = 576
METHOD_ATOL = 1e-3  # as in tests/test_engine_scr.py
SCR = {"method": "scr", "top_k": 6, "lam": 1.6, "diag_layers": [1, 2, 3], "layers": [0, 1, 2]}
TALK = ["Tell me a story.", "What is a cat?", "Say something about trees.", "Count to ten.", "Hello there."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_llava_geometry(tmp_path_factory.mktemp("llava576"), IMAGE_PX)


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def llm(engines, model_dir):
    return engines.get(
        model_dir, max_model_len=1024, max_num_batched_tokens=BUDGET, enable_chunked_prefill=True
    )


@pytest.fixture(scope="module")
def hf(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _sched_stats(llm):
    return dict(_scheduler(llm).__dict__.get(two_pass.STATS_KEY, {}))


def _under_load(llm, processor, scr_case):
    """Five text requests start decoding, then ``scr_case`` arrives; step until all finish.

    Returns the outputs by request id and the SCR request's scheduled chunks ``(first token, count)``.
    """
    engine = llm.llm_engine
    scheduler = _scheduler(llm)
    for i, prompt in enumerate(TALK):
        case = Case("llava", None, prompt, max_tokens=40)
        engine.add_request(f"talk-{i}", vllm_inputs(processor, case), sampling_params(case))
    engine.step()  # the text requests' prefills: from now on they decode in every step
    engine.add_request("scr", vllm_inputs(processor, scr_case), sampling_params(scr_case))
    chunks: dict[str, list[tuple[int, int]]] = {}
    outputs = {}
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        for req_id, n in out.num_scheduled_tokens.items():
            if req_id.startswith("scr"):
                chunks.setdefault(req_id, []).append((scheduler.requests[req_id].num_computed_tokens - n, n))
        return out

    scheduler.schedule = schedule
    try:
        for _ in range(200):
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            if not engine.has_unfinished_requests():
                break
    finally:
        del scheduler.schedule
    assert not engine.has_unfinished_requests()
    return outputs, chunks


def _image_span(processor, case, llm):
    ids = run_vllm(llm, [Case("llava", case.image_seed, case.prompt, max_tokens=1)], processor)[0]
    pos = [
        i
        for i, t in enumerate(ids.prompt_token_ids)
        if t == processor.tokenizer.convert_tokens_to_ids("<image>")
    ]
    assert len(pos) == IMAGE_TOKENS and pos == list(range(pos[0], pos[0] + IMAGE_TOKENS))
    return pos[0], pos[0] + IMAGE_TOKENS


def test_scr_image_waits_for_room_and_the_request_is_edited(llm, processor, hf):
    case = method_case("llava", 7, SCR)
    start, end = _image_span(processor, case, llm)
    (before,) = llm.collective_rpc(worker_stats)
    sched_before = _sched_stats(llm)
    outputs, chunks = _under_load(llm, processor, case)
    (after,) = llm.collective_rpc(worker_stats)
    sched_after = _sched_stats(llm)

    # both passes waited at the image at least once (less room than the image while others decode) ...
    assert sched_after.get("scr_image_holds", 0) - sched_before.get("scr_image_holds", 0) >= 2
    assert len(chunks) == 2 and sum(k.endswith(two_pass.DIAG_SUFFIX) for k in chunks) == 1, chunks
    for req_id, spans in chunks.items():
        # ... then computed the image in one chunk
        assert sum(1 for first, n in spans if first < end and first + n > start) == 1, (req_id, spans)
        assert any(first <= start and first + n >= end for first, n in spans), (req_id, spans)
    assert after["scr_edits"] - before["scr_edits"] == 1
    assert after["scr_split_images"] == before["scr_split_images"]
    assert after["scr_unedited"] == before["scr_unedited"]

    out = outputs["scr"].outputs[0]
    assert out.finish_reason == "length"
    steps = [{tid: lp.logprob for tid, lp in step.items()} for step in out.logprobs]
    gen = Generation(list(out.token_ids), steps, list(outputs["scr"].prompt_token_ids))
    forced = hf_generate(hf, processor, case, force=gen.token_ids, context=recording_reference(hf, SCR, []))
    report = compare(gen, forced)
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    assert_free_greedy_agrees(forced, case)
    (plain,) = run_vllm(llm, [method_case("llava", 7, None)], processor)
    assert gen.token_ids != plain.token_ids or logprob_shift(gen, plain) > 1e-3, "the edit changed nothing"

    # the text requests, delayed a step by the image, still answer as they do alone
    talk = [Case("llava", None, p, max_tokens=40) for p in TALK]
    for i, solo in enumerate(run_vllm(llm, talk, processor)):
        assert list(outputs[f"talk-{i}"].outputs[0].token_ids) == solo.token_ids


def test_a_cut_image_fails_the_request_instead_of_answering_unedited(llm, processor, monkeypatch):
    """With the hold switched off (vLLM's own chunking) the image is cut; the request must end in error."""
    monkeypatch.setattr(two_pass, "whole_image_tokens", lambda computed, num_new, span: num_new)
    case = method_case("llava", 8, SCR)
    before = _sched_stats(llm).get("scr_failed", 0)
    span = _image_span(processor, case, llm)
    outputs, chunks = _under_load(llm, processor, case)
    assert any(two_pass.cuts_image(first, n, span) for spans in chunks.values() for first, n in spans)
    assert outputs["scr"].outputs[0].finish_reason == "error"
    assert _sched_stats(llm).get("scr_failed", 0) == before + 1
    monkeypatch.undo()
    (ok,) = run_vllm(llm, [case], processor)  # the engine serves the next SCR request normally
    assert len(ok.token_ids) == 32
