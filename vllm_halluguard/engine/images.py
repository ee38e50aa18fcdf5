"""Where a request's image tokens are and how they lie on the patch grid (shared by the image methods)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vllm_halluguard.methods.scr import Grid, llava_grid


def image_spans(features: Sequence[Any] | None) -> list[torch.Tensor]:
    """Per image, the sorted prompt positions that receive its embeddings (``mm_position``, ``is_embed``)."""
    spans = []
    for feature in features or ():
        if getattr(feature, "modality", "image") != "image":
            continue
        pr = feature.mm_position
        pos = torch.arange(pr.offset, pr.offset + pr.length)
        if pr.is_embed is not None:
            pos = pos[pr.is_embed.bool().cpu()]
        spans.append(pos)
    return spans


def visual_positions(cached: Any, image_token_id: int | None) -> torch.Tensor:
    """Image-token positions of a runner request (``CachedRequestState``), sorted ``[Nv]``.

    From the multimodal placeholders; without features, the prompt tokens equal to the image token.
    """
    spans = image_spans(getattr(cached, "mm_features", None))
    if spans:
        return torch.cat(spans).sort().values
    ids = cached.prompt_token_ids
    if ids is None or image_token_id is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(torch.tensor(ids) == image_token_id).flatten()


def patch_grid(model_type: str, cached: Any, visual: torch.Tensor) -> Grid:
    """Patch grid ``(t, h, w)`` of a request's single image, in token order.

    LLaVA-1.5: the square row-major grid of the token count. Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the
    extent of the image tokens' M-RoPE ``(t, h, w)`` positions, which are the merged grid's coordinates
    (``(t, h/2, w/2)``). LLaVA-NeXT and -OneVision (a base grid plus tiles) have no single grid; SCR is
    refused on them at admission (``methods.resolve.NOT_APPLICABLE``).
    """
    if model_type == "llava":
        return llava_grid(int(visual.numel()))
    mrope = getattr(cached, "mrope_positions", None)
    if mrope is None:
        raise ValueError(f"no patch grid for model type {model_type!r} (no M-RoPE positions)")
    thw = mrope[:, visual.to(mrope.device)].long()
    t, h, w = (int(x) for x in (thw.amax(-1) - thw.amin(-1) + 1))
    if t * h * w != visual.numel():
        raise ValueError(f"M-RoPE grid {(t, h, w)} does not match {visual.numel()} image tokens")
    return (t, h, w)
