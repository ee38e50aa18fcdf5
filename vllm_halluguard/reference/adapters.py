"""What the reference needs to know about a supported HF model: layers, heads, image tokens, patch grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..methods.base import ModelFamily
from ..methods.resolve import FAMILIES
from ..methods.scr import Grid, llava_grid, qwen2_vl_grid

_FAMILY_BY_MODEL_TYPE: dict[str, ModelFamily] = FAMILIES
#: Families whose image tokens carry M-RoPE ``(t, h, w)`` positions on the merged patch grid.
_MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})


@dataclass
class ModelAdapter:
    """Handles on one supported HF vision-language model (``*ForConditionalGeneration``)."""

    family: ModelFamily
    model: nn.Module
    language_model: nn.Module
    layers: list[nn.Module]
    text_config: Any
    image_token_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelAdapter:
        config: Any = getattr(model, "config", None)
        family = _FAMILY_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
        if family is None:
            model_type = getattr(config, "model_type", None)
            raise ValueError(
                f"unsupported model {type(model).__name__} (model_type={model_type!r}); the reference "
                f"supports {sorted(_FAMILY_BY_MODEL_TYPE)} *ForConditionalGeneration models"
            )
        inner = getattr(model, "model", None)
        language_model = getattr(inner, "language_model", None)
        layers = getattr(language_model, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
        attn = layers[0].self_attn
        text_config = attn.config
        if any(layer.self_attn.config is not text_config for layer in layers):
            raise ValueError("decoder layers do not share one text config")
        return cls(
            family=family,
            model=model,
            language_model=language_model,
            layers=list(layers),
            text_config=text_config,
            image_token_id=int(config.image_token_id),
            num_heads=int(text_config.num_attention_heads),
            num_kv_heads=int(text_config.num_key_value_heads),
            head_dim=int(attn.head_dim),
        )

    def image_grid(self, sample: int, visual_idx: torch.Tensor, model_kwargs: dict[str, Any]) -> Grid:
        """Patch grid ``(t, h, w)`` of the (single) image of ``sample``, in token order.

        LLaVA: the square grid of the token count. Qwen2-VL: ``image_grid_thw`` when the forward gets it,
        else (``generate`` encodes images before the prefill and drops it) the extent of the M-RoPE
        ``(t, h, w)`` position ids of the image tokens, which are the merged grid's coordinates.
        """
        num_tokens = int(visual_idx.shape[-1])
        if self.family == "llava":
            return llava_grid(num_tokens)
        if self.family not in _MROPE_FAMILIES:
            raise ValueError(f"no single patch grid for the {self.family} family (several image tiles)")
        grid_thw = model_kwargs.get("image_grid_thw")
        position_ids = model_kwargs.get("position_ids")
        if grid_thw is not None:
            merge = int(self.model.config.vision_config.spatial_merge_size)
            grid = qwen2_vl_grid(grid_thw[sample], merge)
        elif position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] in (3, 4):
            thw = position_ids[-3:, sample, visual_idx[sample]]  # [3, Nv]
            t, h, w = (int(x) for x in (thw.amax(-1) - thw.amin(-1) + 1))
            grid = (t, h, w)
        else:
            raise ValueError("Qwen2-VL prefill without image_grid_thw or M-RoPE position_ids: no patch grid")
        if grid[0] * grid[1] * grid[2] != num_tokens:
            raise ValueError(
                f"image_grid_thw row {sample} gives {grid} but the prompt has {num_tokens} tokens"
            )
        return grid


def visual_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor | None:
    """Positions ``[B, Nv]`` of the image tokens in each row, or ``None`` if there are none.

    The reference supports one image per sample and the same number of image tokens in every sample.
    """
    is_img = input_ids == image_token_id
    counts = is_img.sum(-1)
    if int(counts.max()) == 0:
        return None
    if bool((counts != counts[0]).any()):
        raise NotImplementedError(
            f"samples have different numbers of image tokens {counts.tolist()}; the reference needs equal "
            "counts (same image size) across the batch"
        )
    b = input_ids.shape[0]
    return torch.nonzero(is_img, as_tuple=True)[1].view(b, -1)
