"""Shared helpers and fixtures for the method and reference tests (tiny HF models, greedy runs)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from vllm_halluguard import reference
from vllm_halluguard.tiny_models import load_hf, make_image

PROMPTS = ("Describe the image.", "What color is the object on the left of the picture?")


@functools.cache
def tiny(name: str) -> tuple[Any, Any]:
    """(model, processor) of a tiny fixture, loaded once per test session."""
    torch.manual_seed(0)
    model, processor = load_hf(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor


@pytest.fixture(scope="session", params=["llava", "qwen2_vl"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def llava() -> tuple[Any, Any]:
    return tiny("llava")


def inputs_for(processor: Any, seeds: tuple[int, ...], prompts: tuple[str, ...]) -> dict[str, Any]:
    return reference.chat_inputs(processor, [make_image(s) for s in seeds], list(prompts))


@dataclass
class Run:
    sequences: torch.Tensor  # [B, n] generated ids
    logits: torch.Tensor  # [B, n, V] raw logits per step
    cache: Any
    ref: Any


def greedy(
    model: Any,
    inputs: dict[str, Any],
    n: int,
    method: Any = None,
    use_cache: bool = True,
) -> Run:
    """Greedy generation of exactly ``n`` tokens with ``method`` applied; logits of every step."""
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), reference.apply(model, method) as ref:
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.get_text_config().pad_token_id,
        )
    return Run(out.sequences[:, prompt_len:], torch.stack(out.logits, 1), out.past_key_values, ref)


def select(inputs: dict[str, Any], i: int, family: str) -> dict[str, Any]:
    """Sample ``i`` of a batch as a batch of one, padding removed."""
    keep = inputs["attention_mask"][i].bool()
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[k] = v[i : i + 1, keep]
        elif (k == "pixel_values" and family == "llava") or k == "image_grid_thw":
            out[k] = v[i : i + 1]
        elif k == "pixel_values":  # Qwen2-VL: patches of all images concatenated
            sizes = (inputs["image_grid_thw"].prod(-1)).tolist()
            start = sum(sizes[:i])
            out[k] = v[start : start + sizes[i]]
        else:
            out[k] = v
    return out
