"""KVSmooth (arXiv 2602.04268): entropy-adaptive EMA of the newest token's cached K and V.

At every decode step, after attention, each smoothed layer takes the current token's attention-row entropy
(mean over query heads), ranks it among the last ``window`` entropies of that layer (strictly-smaller count
divided by the window size), clips the rank to ``lam_ref +- clip`` and [0, 1], and overwrites the token's
cache slot with ``(1 - lam) * K_t + lam * K_{t-1}`` (same for V). ``K_{t-1}`` is the previous cache slot,
itself already smoothed when it is a generated token, so the filter is a recursive EMA. The prompt is never
touched. See docs/methods.md for the ambiguities and the alternatives the config offers.

State layout for batched, persistent device state: a ring buffer ``queue[..., M]`` plus ``count[...]`` (int64,
total number of values pushed). The next value goes to slot ``count % M``; the valid slots are the first
``min(count, M)``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self

import torch
from pydantic import Field

from .base import REFERENCE_DEPTH, LayerSpec, MethodConfig, ModelFamily, Refusal, scale_layer_range

#: lambda_ref of the paper per model family. The paper has LLaVA-1.5's value only; it is reused.
LAMBDA_REF: dict[ModelFamily, float] = {
    "llava": 0.9,
    "qwen2_vl": 0.9,
    "qwen2_5_vl": 0.9,
    "qwen3_vl": 0.9,
    "llava_next": 0.9,
    "llava_onevision": 0.9,
}
#: The paper's layers and lambda_ref are for LLaVA-1.5-7B (32 layers) only.
PAPER_DEPTHS: frozenset[tuple[ModelFamily, int]] = frozenset({("llava", 32)})


class KVSmoothConfig(MethodConfig):
    """KVSmooth hyperparameters (paper defaults; ``None`` = preset for the model)."""

    name: ClassVar[str] = "kvsmooth"
    #: Reads the softmax after PruneHal's mask; its EMA rewrites the new token's K/V after FarSight's
    #: sink has scaled the output (methods/compose.py).
    compose_rank: ClassVar[int] = 30
    composition_refusals: ClassVar[tuple[Refusal, ...]] = (
        Refusal(
            "head_reduce",
            "entropy_of_mean",
            "prunehal",
            "kvsmooth with head_reduce 'entropy_of_mean' does not compose with prunehal (its entropy is "
            "taken outside the attention call, without prunehal's key mask); use 'mean_entropy'",
        ),
    )
    layer_fields: ClassVar[tuple[str, ...]] = ("layers",)
    preset_fields: ClassVar[tuple[str, ...]] = ("lam_ref", "layers")
    paper_fields: ClassVar[dict[tuple[ModelFamily, int], frozenset[str]]] = dict.fromkeys(
        PAPER_DEPTHS, frozenset(preset_fields)
    )

    lam_ref: float | None = Field(default=None, ge=0.0, le=1.0, description="centre of the lambda clip")
    clip: float = Field(default=0.2, ge=0.0, le=1.0, description="lambda is clipped to lam_ref +- clip")
    window: int = Field(default=15, ge=1, le=4096, description="FIFO length M of past entropies per layer")
    layers: LayerSpec | None = Field(default=None, description="smoothed decoder layers (0-based)")
    head_reduce: Literal["mean_entropy", "entropy_of_mean"] = "mean_entropy"
    rank_inclusive: bool = Field(default=False, description="count queue entries <= z instead of < z")
    rank_divisor: Literal["window", "filled"] = "window"
    recursive: bool = Field(default=True, description="EMA against the smoothed (True) or raw previous slot")
    smooth_first_token: bool = Field(default=True, description="smooth the first generated token too")

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        """Paper: smooth LLaVA-1.5 layers 3..30 of 32 (skip 0-2 and the last); scaled to ``num_layers``."""
        ref = REFERENCE_DEPTH[model_family]
        # "skip the first 3 and the last layer of 32", expressed on the family's own reference depth.
        skip_front = -(-3 * ref // 32)
        skip_back = -(-1 * ref // 32)
        layers = scale_layer_range(skip_front, ref - skip_back, ref, num_layers)
        return cls(lam_ref=LAMBDA_REF[model_family], layers=layers)

    def is_noop(self) -> bool:
        if self.layers == ():
            return True
        return self.lam_ref is not None and self.lam_ref + self.clip <= 0.0


def row_entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy ``-sum p log p`` of probability rows (zeros contribute 0), computed in fp32."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(dim)


def row_entropy_from_lse(lse: torch.Tensor, q: torch.Tensor, o_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Row entropy without the probability row: ``H = LSE - scale * <q, o_k>``.

    ``o_k = sum_j p_j k_j`` is the attention output obtained by passing the key cache as the value cache
    (``Attn(q, K, V := K)``); ``lse`` is the row's log-sum-exp of ``scale * q . k_j``. Shapes: ``q`` and
    ``o_k`` ``[..., d]``, ``lse`` ``[...]``.
    """
    return lse.float() - scale * (q.float() * o_k.float()).sum(-1)


def fifo_push(queue: torch.Tensor, count: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Push ``z[...]`` into the ring buffer ``queue[..., M]`` at slot ``count % M``; returns new tensors."""
    m = queue.shape[-1]
    slot = torch.remainder(count, m)
    onehot = torch.arange(m, device=queue.device) == slot.unsqueeze(-1)
    new_queue = torch.where(onehot, z.to(queue.dtype).unsqueeze(-1), queue)
    return new_queue, count + 1


def rank_lambda(
    queue: torch.Tensor,
    count: torch.Tensor,
    z: torch.Tensor,
    lam_ref: float,
    clip: float = 0.2,
    *,
    inclusive: bool = False,
    divisor: Literal["window", "filled"] = "window",
) -> torch.Tensor:
    """Smoothing weight from the percentile rank of ``z`` in the queue that already holds it.

    ``lam_hat = #{valid q : q < z} / M`` (``<=`` with ``inclusive``, in which case ``z`` counts itself;
    divided by the number of valid entries with ``divisor="filled"``), then clipped to ``[lam_ref - clip,
    lam_ref + clip]`` and to ``[0, 1]``. Batched over the leading dims; returns fp32 ``lam[...]``.
    """
    m = queue.shape[-1]
    filled = torch.clamp(count, max=m)
    valid = torch.arange(m, device=queue.device) < filled.unsqueeze(-1)
    zq = z.to(queue.dtype).unsqueeze(-1)
    below = (queue <= zq) if inclusive else (queue < zq)
    k = (below & valid).sum(-1).float()
    denom = float(m) if divisor == "window" else filled.clamp(min=1).float()
    lam_hat = k / denom
    lam = torch.clamp(lam_hat, lam_ref - clip, lam_ref + clip)
    return torch.clamp(lam, 0.0, 1.0)


def update_lambda(
    queue: torch.Tensor,
    count: torch.Tensor,
    z: torch.Tensor,
    cfg: KVSmoothConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One KVSmooth statistic step: push ``z`` then rank it. Returns ``(lam, queue, count)``."""
    if cfg.lam_ref is None:
        raise ValueError("KVSmoothConfig.lam_ref is unresolved; call cfg.for_model(...) first")
    queue, count = fifo_push(queue, count, z)
    lam = rank_lambda(
        queue, count, z, cfg.lam_ref, cfg.clip, inclusive=cfg.rank_inclusive, divisor=cfg.rank_divisor
    )
    return lam, queue, count


def ema(prev: torch.Tensor, cur: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(1 - lam) * cur + lam * prev``, computed in fp32 and cast back to ``cur.dtype``.

    ``lam`` has the batch shape (e.g. ``[B]``) and is broadcast over the trailing dims of ``cur``
    (e.g. ``[B, kv_heads, head_dim]``). ``lam = 0`` returns ``cur`` exactly.
    """
    lam = lam.float().reshape(lam.shape + (1,) * (cur.dim() - lam.dim()))
    out = (1.0 - lam) * cur.float() + lam * prev.float()
    return out.to(cur.dtype)


def head_entropy(probs: torch.Tensor, reduce: Literal["mean_entropy", "entropy_of_mean"]) -> torch.Tensor:
    """Reduce one attention row per head ``probs[..., H, T]`` to one entropy per row ``[...]``."""
    if reduce == "mean_entropy":
        return row_entropy(probs).mean(-1)
    return row_entropy(probs.float().mean(-2))
