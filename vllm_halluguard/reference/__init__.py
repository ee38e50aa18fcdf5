"""Dense HF transformers reference of the four methods ("what users run today", and the engine's oracle).

Example::

    from vllm_halluguard import reference

    with reference.apply(model, {"method": "kvsmooth"}):
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False)

Supports the HF ``*ForConditionalGeneration`` models of every family the engine serves (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``methods.resolve.FAMILIES``; any attention
implementation at load time; the text model runs an eager copy while attached), greedy or sampled decoding
with the KV cache, batches with left padding, one image per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from ..methods import METHODS, Composition, MethodConfig, implementation, parse
from .adapters import ModelAdapter
from .base import ATTN_IMPL, ForwardInfo, ReferenceMethod, RequestInfo
from .compose import ComposedReference


def _reference(name: str, config_cls: type[MethodConfig]) -> type[ReferenceMethod]:
    cls = implementation("vllm_halluguard.reference", name, ReferenceMethod)
    if cls.config_cls is not config_cls:
        raise ImportError(f"{cls.__module__}.{cls.__name__}.config_cls is not {config_cls.__name__}")
    return cls


#: Config class -> reference class, one per registered method: ``reference/<name>.py`` defines it.
REFERENCES: dict[type[MethodConfig], type[ReferenceMethod]] = {
    config_cls: _reference(name, config_cls) for name, config_cls in METHODS.items()
}


def make_reference(method: Any) -> ReferenceMethod | None:
    """The reference object for a method spec (anything :func:`vllm_halluguard.methods.parse` accepts;
    a list composes methods, :class:`ComposedReference`)."""
    config = parse(method)
    if config is None:
        return None
    if isinstance(config, Composition):
        return ComposedReference(config, [REFERENCES[type(m)](m) for m in config.members])
    return REFERENCES[type(config)](config)


@contextlib.contextmanager
def apply(model: nn.Module, method: Any) -> Iterator[ReferenceMethod | None]:
    """Run ``method`` inside ``model`` for the duration of the block; yields the attached reference
    (``None`` for no method). Hooks are removed on exit, also on error.
    """
    ref = make_reference(method)
    if ref is None:
        yield None
        return
    with ref(model):
        yield ref


def generate(model: nn.Module, inputs: Mapping[str, Any], method: Any = None, **generate_kwargs: Any) -> Any:
    """``model.generate(**inputs, **generate_kwargs)`` with ``method`` applied (``None`` = baseline)."""
    with apply(model, method):
        return model.generate(**inputs, **generate_kwargs)


def chat_inputs(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, Any]:
    """Left-padded model inputs for one image + one user prompt per sample, using the chat template."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
    tokenizer = processor.tokenizer
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(processor(text=texts, images=list(images), padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = saved


__all__ = [
    "ATTN_IMPL",
    "REFERENCES",
    "ComposedReference",
    "ForwardInfo",
    "ModelAdapter",
    "ReferenceMethod",
    "RequestInfo",
    "apply",
    "chat_inputs",
    "generate",
    "make_reference",
]
