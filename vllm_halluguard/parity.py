"""Parity harness: the same requests through vLLM and through HF transformers.

Used by the tests (tests/helpers/parity.py re-exports it) and by ``halluguard-check``
(:mod:`vllm_halluguard.check`), so both compare with the same code.

A :class:`Case` is one chat request (fixture, image seed, prompt). vLLM runs it greedily with
``ignore_eos`` and top-k log-probs; HF re-runs vLLM's tokens teacher-forced through ``generate``
(a logits processor forces each token and the raw logits are recorded), so anything that hooks
into HF's generation loop (the dense reference of a method) is exercised on exactly the same path.
:func:`compare` then checks token ids and per-step log-probs.

Method issues reuse it: pass ``extra_args`` for the engine and wrap the HF side in the reference
context manager through ``hf_context``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_halluguard.tiny_models import FixtureName, ensure_fixture, load_hf, make_image

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Case:
    """One request: a fixture, an image (by seed; ``None`` = text only) and a user prompt."""

    fixture: FixtureName
    image_seed: int | None = 0
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 32
    extra_args: dict[str, Any] | None = None

    def image(self) -> Any:
        return None if self.image_seed is None else make_image(self.image_seed)

    def messages(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.prompt}]
        if self.image_seed is not None:
            content.insert(0, {"type": "image"})
        return [{"role": "user", "content": content}]


def method_case(fixture: FixtureName, seed: int | None, spec: Any, prompt: str = DEFAULT_PROMPT) -> Case:
    """A :class:`Case` whose request selects the method ``spec`` (``None`` = a plain request)."""
    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY

    extra = None if spec is None else {EXTRA_ARGS_KEY: spec}
    return Case(fixture, image_seed=seed, prompt=prompt, extra_args=extra)


@dataclass
class Generation:
    """Generated token ids plus, per step, a map token id -> log-prob (vLLM: top-k; HF: full)."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    min_top2_gap: float = float("inf")
    #: Teacher-forced runs only: at each step, the token HF's greedy step would have picked from the
    #: same scores (its ``torch.argmax`` over the processed logits, before the forcing).
    greedy_token_ids: list[int] | None = None


def prompt_text(processor: Any, case: Case) -> str:
    """The chat-templated prompt, identical for both engines."""
    return processor.apply_chat_template(case.messages(), add_generation_prompt=True, tokenize=False)


# ------------------------------------------------------------------------------------------- vLLM

ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    max_num_seqs=16,
    kv_cache_memory_bytes=256 * 1024 * 1024,
    seed=0,
    limit_mm_per_prompt={"image": 1},
)


def make_llm(fixture: FixtureName | Path, **overrides: Any):
    """A vLLM ``LLM`` on a tiny fixture (or a checkpoint folder) with small CPU settings (fp32, eager)."""
    from vllm import LLM

    kwargs = {**ENGINE_DEFAULTS, **overrides}
    model = fixture if isinstance(fixture, Path) else ensure_fixture(fixture)
    return LLM(model=str(model), **kwargs)


def shutdown_llm(llm: Any) -> None:
    """Stop the engine core process of ``llm`` now rather than at interpreter exit."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def vllm_inputs(processor: Any, case: Case) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prompt": prompt_text(processor, case)}
    if case.image_seed is not None:
        inputs["multi_modal_data"] = {"image": case.image()}
    return inputs


def sampling_params(case: Case, logprobs: int = 5):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=case.max_tokens,
        ignore_eos=True,
        logprobs=logprobs,
        extra_args=case.extra_args,
    )


def run_vllm(llm: Any, cases: Sequence[Case], processor: Any | None = None) -> list[Generation]:
    """Submit ``cases`` together (one batch) and return one :class:`Generation` each."""
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(ensure_fixture(cases[0].fixture))
    outs = llm.generate(
        [vllm_inputs(processor, c) for c in cases],
        [sampling_params(c) for c in cases],
        use_tqdm=False,
    )
    gens = []
    for out in outs:
        comp = out.outputs[0]
        steps = [{tid: lp.logprob for tid, lp in step.items()} for step in (comp.logprobs or [])]
        gens.append(Generation(list(comp.token_ids), steps, list(out.prompt_token_ids)))
    return gens


# --------------------------------------------------------------------------------------------- HF


class _ForceTokens:
    """Logits processor that makes greedy decoding emit ``tokens`` one after another.

    It runs last (``generate`` appends custom processors after its own), so ``scores`` are exactly
    what a free greedy step would take the argmax of; that choice is recorded in ``greedy``.
    """

    def __init__(self, tokens: Sequence[int], prompt_len: int) -> None:
        self.tokens, self.prompt_len = list(tokens), prompt_len
        self.greedy: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        self.greedy.append(int(torch.argmax(scores, dim=-1)[0]))  # the op HF's greedy step uses
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def hf_inputs(processor: Any, case: Case, model: Any = None) -> dict[str, torch.Tensor]:
    """The processor's tensors for ``case``; with ``model``, on its device and floats in its dtype."""
    image = case.image()
    kwargs: dict[str, Any] = {"text": [prompt_text(processor, case)], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    inputs = dict(processor(**kwargs))
    if model is None:
        return inputs
    return {
        k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


def hf_generate(
    model: Any,
    processor: Any,
    case: Case,
    force: Sequence[int] | None = None,
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Generation:
    """Greedy HF generation of ``case`` (KV cache on), or teacher-forced on ``force``.

    Log-probs are the log-softmax of the model's raw logits at each step, over the full vocabulary.
    ``context`` (e.g. the dense reference of a method) wraps the ``generate`` call. A forced run also
    records each step's greedy choice (:func:`assert_free_greedy_agrees` uses it).
    """
    inputs = hf_inputs(processor, case, model)
    prompt_len = inputs["input_ids"].shape[1]
    n = len(force) if force is not None else case.max_tokens
    procs = [_ForceTokens(force, prompt_len)] if force is not None else None
    from transformers import LogitsProcessorList

    with torch.no_grad(), context() if context else contextlib.nullcontext():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            logits_processor=LogitsProcessorList(procs) if procs else None,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.get_text_config().pad_token_id,
        )
    ids = out.sequences[0, prompt_len:].tolist()
    logits = torch.stack([lg[0] for lg in out.logits]).float()
    logp = torch.log_softmax(logits, dim=-1)
    top2 = logits.topk(2, dim=-1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    steps = [dict(enumerate(row.tolist())) for row in logp]
    greedy = procs[0].greedy if procs else None
    return Generation(ids, steps, inputs["input_ids"][0].tolist(), gap, greedy)


def recording_reference(
    model: Any, spec: Any, refs: list[Any]
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A ``context`` for :func:`hf_generate`: the dense reference of ``spec``, appended to ``refs``
    on entry (so a test can read its ``trace`` afterwards)."""
    from vllm_halluguard import reference

    @contextlib.contextmanager
    def ctx() -> Iterator[Any]:
        with reference.apply(model, spec) as ref:
            refs.append(ref)
            yield ref

    return ctx


# ---------------------------------------------------------------------------------------- compare


@dataclass
class ParityReport:
    same_tokens: bool
    first_mismatch: int | None
    max_abs_logprob_diff: float
    steps: int

    def __str__(self) -> str:
        return (
            f"same_tokens={self.same_tokens} first_mismatch={self.first_mismatch} "
            f"max|Δlogp|={self.max_abs_logprob_diff:.3g} over {self.steps} steps"
        )


def compare(engine: Generation, reference: Generation) -> ParityReport:
    """Token-id equality and the largest |Δ log-prob| over the engine's top-k at every step."""
    mismatch = next(
        (i for i, (a, b) in enumerate(zip(engine.token_ids, reference.token_ids, strict=False)) if a != b),
        None,
    )
    if mismatch is None and len(engine.token_ids) != len(reference.token_ids):
        mismatch = min(len(engine.token_ids), len(reference.token_ids))
    diff = 0.0
    for eng_step, ref_step in zip(engine.logprobs, reference.logprobs, strict=False):
        for tid, lp in eng_step.items():
            diff = max(diff, abs(lp - ref_step[tid]))
    return ParityReport(mismatch is None, mismatch, diff, len(engine.logprobs))


def free_greedy_mismatch(forced: Generation) -> int | None:
    """First step at which a teacher-forced run's greedy choice differs from its forced token.

    ``None`` means a free greedy run of the same request (same ``context``, as many tokens) emits
    exactly the forced tokens: at step 0 both runs see the same prompt, hence the same scores and the
    same argmax (the forced token); if their prefixes agree up to step t, the scores at t are the same
    computation on the same inputs, so the free run picks the forced token again (induction).
    """
    if forced.greedy_token_ids is None:
        raise ValueError("not a teacher-forced run (hf_generate(force=...))")
    pairs = zip(forced.greedy_token_ids, forced.token_ids, strict=True)
    return next((i for i, (g, t) in enumerate(pairs) if g != t), None)


def assert_free_greedy_agrees(forced: Generation, case: Case) -> None:
    """The free greedy HF run of ``case`` would give ``forced.token_ids`` (see :func:`free_greedy_mismatch`).

    Replaces running it: ``hf_generate(model, processor, case, context=ctx).token_ids == gen.token_ids``
    holds exactly when this passes for ``forced = hf_generate(..., force=gen.token_ids, context=ctx)``
    with the forced tokens equal to ``gen``'s (``compare(gen, forced).same_tokens``).
    """
    assert len(forced.token_ids) == case.max_tokens, (len(forced.token_ids), case.max_tokens)
    step = free_greedy_mismatch(forced)
    assert step is None, (
        f"{case}: at step {step} greedy decoding picks {forced.greedy_token_ids[step]}, "  # type: ignore[index]
        f"not {forced.token_ids[step]}"
    )


def logprob_shift(a: Generation, b: Generation) -> float:
    """Largest |Δ log-prob| over the tokens both runs report at each step (their top-k may differ)."""
    return max(
        (abs(x[t] - y[t]) for x, y in zip(a.logprobs, b.logprobs, strict=True) for t in x.keys() & y.keys()),
        default=0.0,
    )


@contextlib.contextmanager
def engine(fixture: FixtureName, **overrides: Any) -> Iterator[Any]:
    """``with engine("llava") as llm:`` — a tiny-fixture vLLM engine, shut down on exit."""
    llm = make_llm(fixture, **overrides)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def check_fixture(name: FixtureName, n_images: int = 4, max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy-decode a few images with HF and report how far decoding is from ties.

    Returns the smallest top-1/top-2 logit gap over all steps, the share of distinct tokens, and
    whether different images lead to different generations.
    """
    model, processor = load_hf(name)
    gaps, outputs = [], []
    for seed in range(n_images):
        res = hf_generate(model, processor, Case(name, seed, max_tokens=max_new_tokens))
        gaps.append(res.min_top2_gap)
        outputs.append(tuple(res.token_ids))
    tokens = [t for o in outputs for t in o]
    return {
        "min_top1_top2_gap": float(min(gaps)),
        "distinct_token_share": len(set(tokens)) / len(tokens),
        "distinct_generations": len(set(outputs)) / len(outputs),
    }
