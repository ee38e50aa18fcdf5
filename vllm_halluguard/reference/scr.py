"""SCR reference: diagnostic prefill (attention map), then the real prefill with residual-stream edits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.scr import SCRConfig, apply_edit, select_sources, visual_attention_map
from .base import ReferenceMethod, RequestInfo


class SCRReference(ReferenceMethod):
    """Two passes per prompt; decode steps are untouched (the edited K/V stay in the cache).

    The diagnostic is a cache-free copy of the prefill forward that stops after the last diagnostic layer.
    ``trace`` gets one record per prefill: ``{"attn_map": [B, Nv], "sources": [B, K], "owner": [B, Nv],
    "grids": [...]}``.
    """

    config_cls = SCRConfig
    needs_visual = True
    has_diagnostic = True
    config: SCRConfig

    def reset(self, request: RequestInfo) -> None:
        self._diag = frozenset(self.config.diag_layers or ())
        self._edit = frozenset(self.config.layers or ())
        assert request.visual_idx is not None  # needs_visual: the base refuses prompts without an image
        self._vis = request.visual_idx
        self._map_sum: torch.Tensor | None = None
        self._sources: torch.Tensor | None = None
        self._owner: torch.Tensor | None = None

    def on_prefill(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cfg = self.config
        b, nv = self._vis.shape
        if cfg.top_k == 0 or not self._diag or not self._edit:
            attn_map = torch.zeros(b, nv, device=self._vis.device)
        else:
            self.run_diagnostic(model, args, kwargs)
            assert self._map_sum is not None
            attn_map = self._map_sum / len(self._diag)
        grids = [self.attached.image_grid(i, self._vis, kwargs) for i in range(b)]
        sources, owners = [], []
        for i, grid in enumerate(grids):
            sel = select_sources(
                attn_map[i],
                grid,
                cfg.top_k,
                exclude_border=cfg.exclude_border,
                connectivity=cfg.connectivity,
            )
            sources.append(sel.sources)
            owners.append(sel.owner)
        self._sources = torch.cat(sources)
        self._owner = torch.cat(owners)
        self.trace.append(
            {"attn_map": attn_map, "sources": self._sources, "owner": self._owner, "grids": grids}
        )

    def _row_mask(self) -> torch.Tensor:
        """Diagnostic query rows ``[B, T]``: real text tokens after the image, or the last prompt token."""
        positions = self.forward_info.positions
        t = positions.shape[1]
        cols = torch.arange(t, device=positions.device)
        if self.config.diag_rows == "last":
            return (cols == t - 1).expand_as(positions)
        rows = (cols[None, :] > self._vis.max(-1, keepdim=True).values) & (positions >= 0)
        if not bool(rows.any(-1).all()):
            raise ValueError("SCR needs text after the image in every prompt (diag_rows='text_after_image')")
        return rows

    def post_attention(self, layer, query, key, logits, probs, out):
        if self.phase == "diagnostic" and layer in self._diag:
            b, h, t, _ = probs.shape
            idx = self._vis[:, None, None, :].expand(b, h, t, -1)
            layer_map = visual_attention_map(probs.gather(-1, idx), self._row_mask())
            self._map_sum = layer_map if self._map_sum is None else self._map_sum + layer_map
        return out, probs

    def layer_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.phase == "diagnostic":
            if layer >= max(self._diag):
                self.stop_forward()
            return None
        if self.phase != "prefill" or layer not in self._edit:
            return None
        d = hidden.shape[-1]
        idx = self._vis.unsqueeze(-1).expand(-1, -1, d)
        edited = apply_edit(hidden.gather(1, idx), self._sources, self._owner, self.config.lam)
        return hidden.scatter(1, idx, edited)
