"""PruneHal reference: per-layer keep masks over the visual keys, decided after the prefill (step 1) and
after each decode step."""

from __future__ import annotations

import torch

from ..methods.prunehal import (
    PruneHalConfig,
    prune_step,
    visual_attention_stats,
    visual_groups,
)
from .base import ReferenceMethod, RequestInfo


class PruneHalReference(ReferenceMethod):
    """Pruned visual keys get ``-inf`` logits (equal to slicing them out; positions are unchanged).

    The opt-in variant (``selection="shared"``, ``granularity="block"``) ranks as in
    :func:`~vllm_halluguard.methods.prunehal.select_keep`; block groups are absolute prompt positions
    ``// block`` (the engine's KV blocks when ``block`` is the engine's block size).

    The prefill's last query row is measured as step 1 (nothing is pruned yet); decode forward ``j`` is
    step ``j + 1``. ``trace`` gets one record per step: ``{"step", "fired": [B], "kept": [B, n_layers],
    "keep": [B, n_layers, Nv]}`` (the keep mask *after* the step's decision).
    """

    config_cls = PruneHalConfig
    needs_visual = True
    needs_cache = True
    config: PruneHalConfig

    def reset(self, request: RequestInfo) -> None:
        layers = self.config.layers or ()
        self._slot = {layer: i for i, layer in enumerate(layers)}
        vis = request.visual_idx
        assert vis is not None
        b, nv, n = request.batch_size, vis.shape[1], len(layers)
        device = vis.device
        self._vis = vis
        self._keep = torch.ones(b, n, nv, dtype=torch.bool, device=device)
        self._count = torch.zeros(b, dtype=torch.long, device=device)
        self._hist_sum = torch.zeros(b, n, device=device)
        self._hist_n = torch.zeros(b, dtype=torch.long, device=device)
        self._A = torch.zeros(b, n, device=device)
        self._scores = torch.zeros(b, n, nv, device=device)
        self._seen = torch.zeros(n, dtype=torch.bool, device=device)
        self._groups = visual_groups(vis, self.config.block) if self.config.granularity == "block" else None

    def key_mask(self, layer: int) -> torch.Tensor | None:
        if self.phase != "decode" or layer not in self._slot:
            return None
        pruned = ~self._keep[:, self._slot[layer]]
        if not bool(pruned.any()):
            return None
        fwd = self.forward_info
        kv_len = fwd.past_len + fwd.q_len
        drop = torch.zeros(fwd.batch_size, kv_len, dtype=torch.bool, device=pruned.device)
        return drop.scatter(1, self._vis, pruned)

    def post_attention(self, layer, query, key, logits, probs, out):
        if self.phase in ("prefill", "decode") and layer in self._slot:
            i = self._slot[layer]
            b, h = probs.shape[:2]
            idx = self._vis[:, None, :].expand(b, h, -1)
            on_vis = probs[:, :, -1, :].gather(-1, idx)
            self._A[:, i], self._scores[:, i] = visual_attention_stats(
                on_vis, self._keep[:, i], self.config.statistic
            )
            self._seen[i] = True
        return out, probs

    def after_forward(self) -> None:
        if self.phase not in ("prefill", "decode") or not self._slot:
            return
        if not bool(self._seen.all()):
            raise RuntimeError("PruneHal did not see every configured layer in this forward")
        self._seen.zero_()
        step = self.forward_info.step + 1  # the prefill is step 1
        fired, self._keep, self._count, self._hist_sum, self._hist_n = prune_step(
            step,
            self.config,
            self._keep,
            self._count,
            self._A,
            self._scores,
            self._hist_sum,
            self._hist_n,
            self._groups,
        )
        self.trace.append(
            {
                "step": step,
                "fired": fired.clone(),
                "kept": self._keep.sum(-1),
                "keep": self._keep.clone(),
            }
        )
