"""SCR, Spatial Credit Redistribution (arXiv 2602.22469): move activation from top patches to neighbours.

Pass 1 (diagnostic prefill) averages the attention from the text tokens after the image to the visual tokens
over all heads and the diagnostic layers. The ``top_k`` non-border patches by that map are the sources; every
other patch adjacent (8-connected) to a source becomes a neighbour of the highest-ranked adjacent source.
Pass 2 (the real prefill) edits the residual stream after every intervention layer::

    h_n <- h_n + (lam - 1) * h_s      for each neighbour n of source s (h_s before its rescale)
    h_s <- h_s / lam

Sources are never neighbours and neighbour sets are disjoint, so the edit is one linear map on the visual
rows (:func:`redistribution_matrix`), applied with gathers (:func:`apply_edit`). Decoding needs nothing more:
the edited K/V stay in the cache.

Patch grids are ``(t, h, w)`` in token order (row-major): LLaVA-1.5 ``(1, 24, 24)``; Qwen2-VL the merged grid
``(t, h / merge, w / merge)`` of ``image_grid_thw``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple, Self

import torch
from pydantic import Field

from .base import REFERENCE_DEPTH, LayerSpec, MethodConfig, ModelFamily, Refusal, scale_layer_range

Grid = tuple[int, int, int]

#: Paper's 0-based inclusive ranges as half-open [start, stop) on the family's reference depth.
#: Families without a paper value reuse the ranges of their language model's family (Qwen2-VL's for
#: Qwen2.5-VL, Qwen3-VL and the Qwen2-based LLaVA-OneVision, LLaVA-1.5's for LLaVA-NeXT).
DIAG_RANGE: dict[ModelFamily, tuple[int, int]] = {
    "llava": (8, 17),
    "qwen2_vl": (8, 17),
    "qwen2_5_vl": (8, 17),
    "qwen3_vl": (8, 17),
    "llava_next": (8, 17),
    "llava_onevision": (8, 17),
}
INTERVENTION_RANGE: dict[ModelFamily, tuple[int, int]] = {
    "llava": (0, 12),
    "qwen2_vl": (0, 16),
    "qwen2_5_vl": (0, 16),
    "qwen3_vl": (0, 16),
    "llava_next": (0, 12),
    "llava_onevision": (0, 16),
}
#: Models the paper gives the ranges for (diagnostic 8-16 on all): LLaVA-1.5-7B (32 layers) and -13B (40),
#: both intervening on 0-11; Qwen2-VL-7B (28) on 0-15. Used as they are, never scaled.
PAPER_DEPTHS: frozenset[tuple[ModelFamily, int]] = frozenset({("llava", 32), ("llava", 40), ("qwen2_vl", 28)})


class SCRConfig(MethodConfig):
    """SCR hyperparameters (paper defaults; ``None`` = preset for the model)."""

    name: ClassVar[str] = "scr"
    #: Acts between layers (its edit of a layer's output is read by the next layer's attention): first.
    compose_rank: ClassVar[int] = 10
    composition_refusals: ClassVar[tuple[Refusal, ...]] = ()
    layer_fields: ClassVar[tuple[str, ...]] = ("diag_layers", "layers")
    preset_fields: ClassVar[tuple[str, ...]] = ("diag_layers", "layers")
    paper_fields: ClassVar[dict[tuple[ModelFamily, int], frozenset[str]]] = dict.fromkeys(
        PAPER_DEPTHS, frozenset(preset_fields)
    )

    lam: float = Field(default=1.10, ge=1.0, le=4.0, description="sources / lam, neighbours + (lam-1) h_s")
    top_k: int = Field(default=32, ge=0, le=4096, description="number of source patches K")
    connectivity: Literal[8, 4] = Field(default=8, description="neighbourhood on the patch grid")
    exclude_border: bool = Field(default=True, description="border patches are never sources")
    diag_rows: Literal["text_after_image", "last"] = Field(
        default="text_after_image", description="query rows averaged in the diagnostic map"
    )
    diag_layers: LayerSpec | None = Field(default=None, description="layers averaged in the diagnostic")
    layers: LayerSpec | None = Field(default=None, description="intervention layers (residual after each)")

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        """Paper: diagnostic layers 8-16; intervention 0-11 (LLaVA-1.5-7B/13B) or 0-15 (Qwen2-VL-7B), as
        given at those depths and scaled from the 7B depth at any other."""
        if (model_family, num_layers) in PAPER_DEPTHS:
            return cls(
                diag_layers=tuple(range(*DIAG_RANGE[model_family])),
                layers=tuple(range(*INTERVENTION_RANGE[model_family])),
            )
        ref = REFERENCE_DEPTH[model_family]
        return cls(
            diag_layers=scale_layer_range(*DIAG_RANGE[model_family], ref, num_layers),
            layers=scale_layer_range(*INTERVENTION_RANGE[model_family], ref, num_layers),
        )

    def is_noop(self) -> bool:
        return self.top_k == 0 or self.lam == 1.0 or self.layers == ()


class Selection(NamedTuple):
    """Sources and neighbour ownership for a batch of patch maps.

    ``sources[B, K]``: patch indices by descending attention, ``-1`` padding when fewer than ``K`` patches
    qualify. ``owner[B, N]``: for each patch, the source it is a neighbour of, or ``-1``.
    """

    sources: torch.Tensor
    owner: torch.Tensor

    def neighbours(self, max_per_source: int = 8) -> torch.Tensor:
        """Neighbour lists ``[B, K, max_per_source]`` in ascending patch order, ``-1`` padded."""
        b, k = self.sources.shape
        out = torch.full((b, k, max_per_source), -1, dtype=torch.long, device=self.owner.device)
        for bi in range(b):
            for ki in range(k):
                s = int(self.sources[bi, ki])
                if s < 0:
                    continue
                idx = torch.nonzero(self.owner[bi] == s).flatten()[:max_per_source]
                out[bi, ki, : idx.numel()] = idx
        return out


def llava_grid(num_tokens: int) -> Grid:
    """LLaVA-1.5 square row-major grid ``(1, s, s)`` for ``s * s`` image tokens."""
    s = math.isqrt(num_tokens)
    if s * s != num_tokens:
        raise ValueError(f"LLaVA image with {num_tokens} tokens is not a square grid")
    return (1, s, s)


def qwen2_vl_grid(grid_thw: tuple[int, int, int] | torch.Tensor, merge_size: int = 2) -> Grid:
    """Qwen2-VL merged token grid ``(t, h // merge, w // merge)`` from one row of ``image_grid_thw``."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {t, h, w} is not divisible by merge size {merge_size}")
    return (t, h // merge_size, w // merge_size)


def border_mask(grid: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[t*h*w]``: patches in the first/last row or column of their frame."""
    t, h, w = grid
    rows = torch.arange(h, device=device).view(1, h, 1).expand(t, h, w)
    cols = torch.arange(w, device=device).view(1, 1, w).expand(t, h, w)
    edge = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    return edge.reshape(-1)


def _offsets(connectivity: int) -> list[tuple[int, int]]:
    if connectivity == 4:
        return [(-1, 0), (0, -1), (0, 1), (1, 0)]
    return [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def _shift(x: torch.Tensor, dr: int, dc: int, fill: float | int) -> torch.Tensor:
    """``y[..., r, c] = x[..., r + dr, c + dc]`` (``fill`` outside the frame) on ``[..., h, w]``."""
    h, w = x.shape[-2:]
    y = torch.full_like(x, fill)
    r0, r1 = max(0, -dr), min(h, h - dr)
    c0, c1 = max(0, -dc), min(w, w - dc)
    if r0 < r1 and c0 < c1:
        y[..., r0:r1, c0:c1] = x[..., r0 + dr : r1 + dr, c0 + dc : c1 + dc]
    return y


def select_sources(
    attn_map: torch.Tensor,
    grid: Grid,
    top_k: int,
    *,
    exclude_border: bool = True,
    connectivity: int = 8,
) -> Selection:
    """Pick sources and assign neighbours on a patch grid (batched, no loop over patches).

    ``attn_map[N]`` or ``[B, N]`` with ``N = t*h*w`` in grid order. Sources: the ``top_k`` highest patches
    that are not on the border (ties: lower index first). Neighbours: every non-source patch adjacent to a
    source belongs to the highest-ranked adjacent source ("higher-attention sources claim neighbours first").
    """
    if attn_map.dim() == 1:
        attn_map = attn_map.unsqueeze(0)
    b, n = attn_map.shape
    t, h, w = grid
    if t * h * w != n:
        raise ValueError(f"attention map of {n} patches does not match grid {grid}")
    device = attn_map.device
    eligible = torch.ones(n, dtype=torch.bool, device=device)
    if exclude_border:
        eligible = ~border_mask(grid, device)
    k = min(top_k, int(eligible.sum()))
    neg = torch.full(attn_map.shape, -math.inf, dtype=torch.float32, device=device)
    scores = torch.where(eligible, attn_map.float(), neg)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    sources = torch.full((b, max(top_k, 0)), -1, dtype=torch.long, device=device)
    sources[:, :k] = order
    # rank[p] = priority of p as a source (0 = highest), BIG if p is not a source.
    big = n + 1
    rank = torch.full((b, n), big, dtype=torch.long, device=device)
    rank.scatter_(1, order, torch.arange(k, device=device).expand(b, k))
    rank_grid = rank.view(b, t, h, w)
    best = torch.full_like(rank_grid, big)
    for dr, dc in _offsets(connectivity):
        best = torch.minimum(best, _shift(rank_grid, dr, dc, big))
    best = best.view(b, n)
    is_source = rank < big
    claimed = (best < big) & ~is_source
    owner_rank = best.clamp(max=max(k - 1, 0))
    owner = torch.where(claimed, order.gather(1, owner_rank) if k > 0 else owner_rank, -1)
    return Selection(sources=sources, owner=owner)


def redistribution_matrix(sources: torch.Tensor, owner: torch.Tensor, lam: float) -> torch.Tensor:
    """Dense ``M[B, N, N]`` with ``H_vis <- M @ H_vis``:
    ``M = I + (lam - 1) sum_n e_n e_s^T - (1 - 1/lam) sum_s e_s e_s^T``.
    """
    b, n = owner.shape
    eye = torch.eye(n, dtype=torch.float64, device=owner.device).expand(b, n, n).clone()
    bi, ni = torch.nonzero(owner >= 0, as_tuple=True)
    eye[bi, ni, owner[bi, ni]] += lam - 1.0
    sb, sk = torch.nonzero(sources >= 0, as_tuple=True)
    s = sources[sb, sk]
    eye[sb, s, s] -= 1.0 - 1.0 / lam
    return eye


def source_mask(sources: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bool ``[B, N]``: which patches are sources."""
    b = sources.shape[0]
    mask = torch.zeros(b, num_patches + 1, dtype=torch.bool, device=sources.device)
    idx = torch.where(sources >= 0, sources, num_patches)
    mask.scatter_(1, idx, True)
    return mask[:, :num_patches]


def apply_edit(h_vis: torch.Tensor, sources: torch.Tensor, owner: torch.Tensor, lam: float) -> torch.Tensor:
    """Apply the SCR map to visual rows ``h_vis[B, N, D]``; returns a new tensor.

    Neighbours get ``(lam - 1) * h_s`` of their owner source (pre-edit value), sources are divided by ``lam``,
    all other rows are returned bit-exactly.
    """
    is_src = source_mask(sources, h_vis.shape[1]).unsqueeze(-1)
    has_owner = (owner >= 0).unsqueeze(-1)
    idx = owner.clamp(min=0).unsqueeze(-1).expand_as(h_vis)
    h_owner = torch.gather(h_vis, 1, idx)
    h_nb = torch.where(has_owner, h_vis + (lam - 1.0) * h_owner, h_vis)
    return torch.where(is_src, h_vis / lam, h_nb)


def visual_attention_map(probs_on_visual: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Diagnostic map ``[B, Nv]``: mean over heads and selected query rows.

    ``probs_on_visual[B, H, T, Nv]``: attention of every query row on the visual keys; ``row_mask[B, T]``
    selects the rows (e.g. text tokens after the image). Average several layers' maps for the final map.
    """
    per_row = probs_on_visual.float().mean(1)
    w = row_mask.float().unsqueeze(-1)
    return (per_row * w).sum(1) / w.sum(1).clamp(min=1.0)
