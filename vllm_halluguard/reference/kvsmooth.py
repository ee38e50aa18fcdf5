"""KVSmooth reference: after each decode step's attention, EMA the new token's K/V slot in the cache."""

from __future__ import annotations

from typing import Any

import torch

from ..methods.kvsmooth import KVSmoothConfig, ema, head_entropy, update_lambda
from .base import ReferenceMethod, RequestInfo


class KVSmoothReference(ReferenceMethod):
    """Decode only, after attention, recursive EMA, one FIFO of ``window`` entropies per smoothed layer.

    ``trace`` gets one record per decode step: ``{"step", "lam": [B, n_layers]}``.
    """

    config_cls = KVSmoothConfig
    needs_cache = True
    config: KVSmoothConfig

    def reset(self, request: RequestInfo) -> None:
        layers = self.config.layers or ()
        self._slot = {layer: i for i, layer in enumerate(layers)}
        b, m, n = request.batch_size, self.config.window, len(layers)
        device = request.prompt_lengths.device
        self._queue = torch.zeros(b, n, m, device=device)
        self._count = torch.zeros(b, n, dtype=torch.long, device=device)
        self._lam = torch.zeros(b, n, device=device)
        self._z: dict[int, torch.Tensor] = {}
        self._raw_prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def post_attention(self, layer, query, key, logits, probs, out):
        if self.phase == "decode" and layer in self._slot:
            # probs[B, H, 1, T]: entropy of the current token's row, reduced over heads.
            self._z[layer] = head_entropy(probs[:, :, -1, :], self.config.head_reduce)
        return out, probs

    def after_attention(self, layer: int, cache: Any) -> None:
        if self.phase != "decode" or layer not in self._slot:
            return
        if cache is None:
            raise RuntimeError("KVSmooth needs the KV cache (generate with use_cache=True)")
        cache_layer = cache.layers[layer]
        if type(cache_layer).__name__ != "DynamicLayer":
            raise NotImplementedError(f"KVSmooth reference needs a DynamicCache, got {type(cache_layer)}")
        i = self._slot[layer]
        lam, queue, count = update_lambda(
            self._queue[:, i], self._count[:, i], self._z.pop(layer), self.config
        )
        self._queue[:, i], self._count[:, i] = queue, count
        if self.forward_info.step == 1 and not self.config.smooth_first_token:
            lam = torch.zeros_like(lam)
        self._lam[:, i] = lam
        keys, values = cache_layer.keys, cache_layer.values
        cur_k, cur_v = keys[:, :, -1].clone(), values[:, :, -1].clone()
        if self.config.recursive:
            prev_k, prev_v = keys[:, :, -2], values[:, :, -2]
        else:
            prev_k, prev_v = self._raw_prev.get(layer, (keys[:, :, -2], values[:, :, -2]))
            self._raw_prev[layer] = (cur_k, cur_v)
        keys[:, :, -1] = ema(prev_k, cur_k, lam)
        values[:, :, -1] = ema(prev_v, cur_v, lam)

    def after_forward(self) -> None:
        if self.phase == "decode":
            self.trace.append({"step": self.forward_info.step, "lam": self._lam.clone()})
