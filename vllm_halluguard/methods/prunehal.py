"""PruneHal (arXiv 2510.19183): adaptive pruning of low-attention visual KV entries during decoding.

Step ``m`` (1-based) is the forward that produces generated token ``m``: step 1 is the prefill (its last
query row, the prompt's last token, seeds the history), step ``m >= 2`` the decode forward that consumes
token ``m - 1``. Each step measures, per layer, the last query's head-averaged attention on the still-kept
visual tokens: a per-token score and its mean ``A_l``. A prune fires at ``m == force_step`` (2: the first
decode forward) and afterwards whenever at least ``vote_frac`` of the layers have
``A_l < sqrt(r) * history_l``, at most ``t`` times. A prune keeps, per layer, the ``floor(r * |S_l|)`` kept
tokens with the highest score at that step; it takes effect from the next forward, so generated tokens
``1..force_step`` equal the unmitigated run's and token ``force_step + 1`` (the 3rd) is the first that can
differ.
Pruned keys are masked (additive -inf), which equals slicing them out of the cache as long as the remaining
keys keep their RoPE positions (tested). Text and generated tokens are never pruned.

Variant (not in the paper, opt-in): ``selection="shared"`` ranks the visual tokens once for all layers by
the layers' mean score, so every layer keeps the same set; ``granularity="block"`` ranks groups of ``block``
consecutive prompt positions (aligned to multiples of ``block``, like vLLM's KV blocks) by their summed
score and keeps the top ``floor(r * |kept groups|)`` groups whole. With both, a prune leaves whole KV
blocks unread by every layer, and the engine gives them back to vLLM's block pool
(``docs/prunehal-blocks.md``).

History (best reading, spec 4.7.1): ``history_l`` is the mean of ``A_l`` over the steps since the last
prune (since step 1, the prefill, before any prune), re-initialised at a prune to the value measured at
that step.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Self

import torch
from pydantic import Field

from .base import LayerSpec, MethodConfig, ModelFamily, Refusal

#: (r, t) of the paper: LLaVA-1.5 (0.4, 3); Qwen-VL-7B (0.9, 4), reused for Qwen2-VL.
#: Families the paper does not evaluate reuse the values of their language model's family.
PRESET_RT: dict[ModelFamily, tuple[float, int]] = {
    "llava": (0.4, 3),
    "qwen2_vl": (0.9, 4),
    "qwen2_5_vl": (0.9, 4),
    "qwen3_vl": (0.9, 4),
    "llava_next": (0.4, 3),
    "llava_onevision": (0.9, 4),
}
#: The paper's (r, t) and all-layer setting are for LLaVA-1.5-7B (32 layers) and -13B (40); its Qwen
#: model is Qwen-VL-7B, not Qwen2-VL, so Qwen2-VL's values are reused, not given.
PAPER_DEPTHS: frozenset[tuple[ModelFamily, int]] = frozenset({("llava", 32), ("llava", 40)})

_EPS = 1e-9


class PruneHalConfig(MethodConfig):
    """PruneHal hyperparameters (paper defaults; ``None`` = preset for the model)."""

    name: ClassVar[str] = "prunehal"
    #: Its key mask shapes the softmax the later members read: before KVSmooth and FarSight.
    compose_rank: ClassVar[int] = 20
    composition_refusals: ClassVar[tuple[Refusal, ...]] = (
        Refusal(
            "selection",
            "shared",
            None,
            "prunehal with selection 'shared' (block reclaim) is served alone, not in a composition; "
            "compose the paper's selection 'per_layer'",
            note="(the block-reclaiming variant)",
        ),
    )
    layer_fields: ClassVar[tuple[str, ...]] = ("layers",)
    preset_fields: ClassVar[tuple[str, ...]] = ("r", "t", "layers")
    paper_fields: ClassVar[dict[tuple[ModelFamily, int], frozenset[str]]] = dict.fromkeys(
        PAPER_DEPTHS, frozenset(preset_fields)
    )

    r: float | None = Field(default=None, gt=0.0, le=1.0, description="fraction of kept visual tokens kept")
    t: int | None = Field(default=None, ge=0, le=64, description="maximum number of prunes")
    vote_frac: float = Field(default=0.5, gt=0.0, le=1.0, description="fraction of layers that must vote")
    vote_threshold: float | None = Field(
        default=None, gt=0.0, description="a layer votes if A < threshold * history; None = sqrt(r)"
    )
    force_step: int | None = Field(
        default=2, ge=1, description="step of the forced prune (1 = prefill, 2 = first decode); None = off"
    )
    history: Literal["running_mean", "first_step"] = "running_mean"
    statistic: Literal["mean", "mass"] = Field(
        default="mean", description="A_l as per-token mean or total visual attention mass"
    )
    layers: LayerSpec | None = Field(default=None, description="voting and pruned layers; None = all")
    selection: Literal["per_layer", "shared"] = Field(
        default="per_layer", description="a top set per layer (paper), or one for all layers (mean score)"
    )
    granularity: Literal["token", "block"] = Field(
        default="token", description="rank visual tokens (paper), or groups of `block` prompt positions"
    )
    block: int = Field(default=16, ge=1, le=1024, description="positions per group (granularity=block)")

    @property
    def frees_blocks(self) -> bool:
        """Whether a prune can leave whole KV blocks unread by all layers (the reclaiming variant)."""
        return self.selection == "shared" and not self.is_noop()

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        """Paper (r, t) for the family; all decoder layers."""
        r, t = PRESET_RT[model_family]
        return cls(r=r, t=t, layers=tuple(range(num_layers)))

    def threshold(self) -> float:
        """The vote threshold: ``vote_threshold`` or ``sqrt(r)``."""
        if self.vote_threshold is not None:
            return self.vote_threshold
        if self.r is None:
            raise ValueError("PruneHalConfig.r is unresolved; call cfg.for_model(...) first")
        return math.sqrt(self.r)

    def is_noop(self) -> bool:
        return self.r == 1.0 or self.t == 0 or self.layers == ()


def keep_count(n: torch.Tensor | int, r: float) -> torch.Tensor | int:
    """``floor(r * n)`` with a tiny epsilon so that e.g. 0.4 * 230 = 92 exactly."""
    if isinstance(n, torch.Tensor):
        return torch.floor(n.double() * r + _EPS).to(n.dtype)
    return math.floor(n * r + _EPS)


def visual_attention_stats(
    probs_on_visual: torch.Tensor,
    keep_mask: torch.Tensor,
    statistic: Literal["mean", "mass"] = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer visual-attention statistic and per-token scores of the last query row.

    ``probs_on_visual[..., H, Nv]``: softmax probabilities of the last row on the visual keys (full-row
    normalisation); ``keep_mask[..., Nv]`` bool. Returns ``(A[...], scores[..., Nv])`` where
    ``scores = mean_h p`` and ``A`` is the mean (or sum, ``statistic="mass"``) of the scores over kept tokens.
    """
    return scores_statistic(probs_on_visual.float().mean(-2), keep_mask, statistic)


def scores_statistic(
    scores: torch.Tensor, keep_mask: torch.Tensor, statistic: Literal["mean", "mass"] = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`visual_attention_stats` from the head-averaged ``scores[..., Nv]`` (fp32)."""
    keep = keep_mask.to(scores.dtype)
    total = (scores * keep).sum(-1)
    if statistic == "mass":
        return total, scores
    return total / keep.sum(-1).clamp(min=1.0), scores


def should_prune(
    step: int | torch.Tensor,
    count: torch.Tensor,
    A: torch.Tensor,
    history: torch.Tensor,
    r: float,
    t: int,
    vote_frac: float = 0.5,
    force_step: int | None = 2,
    threshold: float | None = None,
) -> torch.Tensor:
    """Whether each request prunes after this step. Returns bool ``[B]``.

    ``count[B]``: prunes so far; ``A[B, L]``: this step's statistic on the voting layers; ``history[B, L]``:
    the reference value per layer (NaN where there is none yet: such layers never vote). A layer votes when
    ``A < threshold * history`` (``threshold`` defaults to ``sqrt(r)``); the request prunes when
    ``count < t`` and either ``step == force_step`` or, for ``step > force_step`` (any step when the forced
    prune is off), the voting fraction is ``>= vote_frac``.
    """
    thr = math.sqrt(r) if threshold is None else threshold
    if isinstance(step, torch.Tensor):
        step_t = step if step.device == A.device else step.to(A.device)
    else:
        step_t = torch.as_tensor(step, device=A.device)
    votes = (thr * history > A).float().mean(-1)
    majority = votes >= vote_frac - _EPS
    if force_step is not None:
        majority = (step_t == force_step) | ((step_t > force_step) & majority)
    return majority & (count < t)


def keep_topr(scores: torch.Tensor, keep_mask: torch.Tensor, r: float) -> torch.Tensor:
    """New keep mask: per row of ``[..., Nv]``, the ``floor(r * |S|)`` kept tokens with the highest score.

    Ties break towards the lower index. Tokens outside ``keep_mask`` stay pruned.
    """
    n_keep = keep_count(keep_mask.sum(-1), r)
    assert isinstance(n_keep, torch.Tensor)
    masked = torch.where(keep_mask, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return keep_mask & (ranks < n_keep.unsqueeze(-1))


def keep_blocks(
    scores: torch.Tensor,
    keep_mask: torch.Tensor,
    groups: torch.Tensor,
    r: float,
    num_groups: int | None = None,
) -> torch.Tensor:
    """Block-granular :func:`keep_topr`: groups ranked by the summed scores of their kept tokens.

    ``groups[..., Nv]``: group index of each visual token (``position // block``, counted from the
    request's first group). Keeps the ``floor(r * |groups with a kept token|)`` best groups whole;
    ties break towards the lower group. Tokens outside ``keep_mask`` stay pruned. ``num_groups`` (at least
    ``groups.max() + 1``), where the caller knows it, saves reading the maximum back from the device.
    """
    groups = groups.expand_as(keep_mask)
    n = num_groups if num_groups is not None else int(groups.max()) + 1 if groups.numel() else 1
    shape = (*keep_mask.shape[:-1], n)
    kept = keep_mask.to(torch.float32)
    zeros = torch.zeros(shape, dtype=torch.float32, device=keep_mask.device)
    summed = zeros.scatter_add(-1, groups, scores.float() * kept)
    alive = zeros.scatter_add(-1, groups, kept) > 0
    return keep_mask & keep_topr(summed, alive, r).gather(-1, groups)


def select_keep(
    scores: torch.Tensor,
    keep_mask: torch.Tensor,
    cfg: PruneHalConfig,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> torch.Tensor:
    """The keep mask after a prune of ``[B, L, Nv]``: per layer (paper) or shared, by token or by group.

    ``selection="shared"`` ranks by the mean score over the layers (all layers' masks are equal then);
    ``granularity="block"`` needs ``groups`` (``[B, Nv]``, and optionally ``num_groups``: see
    :func:`keep_blocks`).
    """
    assert cfg.r is not None
    if cfg.selection == "shared":
        scores = scores.float().mean(-2, keepdim=True).expand_as(scores)
    if cfg.granularity == "token":
        return keep_topr(scores, keep_mask, cfg.r)
    if groups is None:
        raise ValueError("granularity='block' needs the visual tokens' groups")
    return keep_blocks(scores, keep_mask, groups.unsqueeze(-2), cfg.r, num_groups)


def visual_groups(visual: torch.Tensor, block: int) -> torch.Tensor:
    """Group index (``position // block``, from the first group) of each visual position ``[..., Nv]``."""
    g = torch.div(visual, block, rounding_mode="floor")
    return g - g[..., :1] if g.numel() else g


def update_history(
    hist_sum: torch.Tensor,
    hist_n: torch.Tensor,
    A: torch.Tensor,
    pruned: torch.Tensor,
    mode: Literal["running_mean", "first_step"] = "running_mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """History after a step: ``(sum[B, L], n[B])``; :func:`history_mean` turns it into the reference value.

    ``running_mean``: add ``A`` (``n += 1``), or restart from ``A`` (``n = 1``) for requests that pruned.
    ``first_step``: keep the first measured value forever.
    """
    A = A.float()
    if mode == "first_step":
        first = hist_n == 0
        return torch.where(first.unsqueeze(-1), A, hist_sum), torch.where(first, 1, hist_n)
    restart = pruned.unsqueeze(-1)
    new_sum = torch.where(restart, A, hist_sum + A)
    new_n = torch.where(pruned, torch.ones_like(hist_n), hist_n + 1)
    return new_sum, new_n


def history_mean(hist_sum: torch.Tensor, hist_n: torch.Tensor) -> torch.Tensor:
    """``sum / n`` per layer, NaN where no step has been recorded."""
    n = hist_n.float().unsqueeze(-1)
    return torch.where(n > 0, hist_sum / n.clamp(min=1.0), torch.full_like(hist_sum, math.nan))


def prune_schedule(num_visual: int, r: float, t: int) -> list[int]:
    """Visual-token counts after 0..t prunes with floor rounding, e.g. 576 -> 230 -> 92 -> 36."""
    counts = [num_visual]
    for _ in range(t):
        counts.append(int(keep_count(counts[-1], r)))
    return counts


def prune_step(
    step: int | torch.Tensor,
    cfg: PruneHalConfig,
    keep: torch.Tensor,
    count: torch.Tensor,
    A: torch.Tensor,
    scores: torch.Tensor,
    hist_sum: torch.Tensor,
    hist_n: torch.Tensor,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    skip_idle: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole decision after step ``step`` (1 = the prefill) for a batch of requests.

    ``keep[B, L, Nv]``, ``count[B]``, ``A[B, L]``, ``scores[B, L, Nv]``, history ``(sum[B, L], n[B])``;
    ``groups[B, Nv]`` for ``granularity="block"`` (:func:`visual_groups`).
    Returns ``(fired[B], keep, count, hist_sum, hist_n)``: requests that prune keep their top
    ``floor(r |S_l|)`` per layer (:func:`select_keep` for the variant), count one more prune and
    restart their history. ``skip_idle=False`` selects the new masks whether or not a request fired,
    instead of asking the host (a device sync) whether any did; with ``num_groups`` (block granularity)
    nothing is read back at all.
    """
    if cfg.r is None or cfg.t is None:
        raise ValueError("PruneHalConfig.r/t are unresolved; call cfg.for_model(...) first")
    fired = should_prune(
        step,
        count,
        A,
        history_mean(hist_sum, hist_n),
        cfg.r,
        cfg.t,
        vote_frac=cfg.vote_frac,
        force_step=cfg.force_step,
        threshold=cfg.threshold(),
    )
    if not skip_idle or bool(fired.any()):
        keep = torch.where(fired[:, None, None], select_keep(scores, keep, cfg, groups, num_groups), keep)
    hist_sum, hist_n = update_history(hist_sum, hist_n, A, fired, cfg.history)
    return fired, keep, count + fired.long(), hist_sum, hist_n
