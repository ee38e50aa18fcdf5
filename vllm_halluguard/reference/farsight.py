"""FarSight reference: standard attention rescaled per row by ``sigmoid(LSE - log R)``.

The register mass ``R`` comes from the closed form in :mod:`vllm_halluguard.methods.farsight`, computed
from each row's position among the *real* tokens of its sample, so HF's additive causal/padding mask never
touches the registers (the official patch's pitfall) and left-padded batches give the same rows as batch 1.

Mode A recomputes the whole sequence at every step as the official code does: while attached, ``generate``
is called with ``use_cache=False``; a cached forward raises.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..methods.farsight import FarSightConfig, rescale_factor, row_log_r, sink_logits
from .base import ReferenceMethod, RequestInfo

logger = logging.getLogger(__name__)


class FarSightReference(ReferenceMethod):
    """Modes A (official, no cache), B (per-head sink) and C (prompt rows only)."""

    config_cls = FarSightConfig
    config: FarSightConfig

    def reset(self, request: RequestInfo) -> None:
        self._layers = frozenset(self.config.layers or ())
        self._cached_log_r: torch.Tensor | None = None
        self._log_r_fwd: object = None

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Mode A: force ``use_cache=False`` (the official code recomputes the sequence every step)."""
        if not self.config.needs_recompute:
            return
        if kwargs.get("use_cache") is True:
            logger.info("FarSight mode A recomputes every step: overriding use_cache=True")
        kwargs["use_cache"] = False

    def _log_r(self) -> torch.Tensor | None:
        """``log R`` broadcastable to ``[B, H, q]`` for this forward, or ``None`` when no row changes."""
        cfg, fwd = self.config, self.forward_info
        h = self.attached.num_heads
        if math.isinf(cfg.sigma):
            return None
        if cfg.mode == "B":
            dev = fwd.positions.device
            return sink_logits(h, cfg.sigma, cfg.alibi, cfg.progressive_c, device=dev).view(1, h, 1)
        if fwd.phase == "decode":
            if cfg.mode == "A":
                raise RuntimeError(
                    "FarSight mode A recomputes the full sequence each step; run it without a KV cache "
                    "(generate under the reference does this) or use mode B/C"
                )
            return None  # mode C: generated rows have no registers
        rows = fwd.query_positions  # [B, q], -1 on padding
        log_r = row_log_r(rows, fwd.lengths[:, None], h, cfg.sigma, cfg.alibi, cfg.progressive)  # [H, B, q]
        log_r = log_r.permute(1, 0, 2)
        return torch.where((rows >= 0)[:, None, :], log_r, torch.full_like(log_r, -math.inf))

    def post_attention(self, layer, query, key, logits, probs, out):
        if layer not in self._layers:
            return out, probs
        if self._log_r_fwd is not self.fwd:  # once per forward, shared by all layers
            self._cached_log_r, self._log_r_fwd = self._log_r(), self.fwd
        log_r = self._cached_log_r
        if log_r is None:
            return out, probs
        lse = torch.logsumexp(logits.float(), dim=-1)
        factor = rescale_factor(lse, log_r.to(lse.device))
        out = (out.float() * factor.unsqueeze(-1)).to(out.dtype)
        probs = (probs.float() * factor.unsqueeze(-1)).to(probs.dtype)
        return out, probs
