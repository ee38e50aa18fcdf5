"""CPU attention backend with per-request methods (registered over vLLM's ``CPU_ATTN``).

Plain rows use vLLM's native CPU kernel unchanged: the impl first runs the native kernel on the whole
batch, then, only when the step has mitigated rows, lets each method rework its rows through the
torch path over the paged cache (:mod:`vllm_halluguard.engine.cpu_cache`): single-token rows of a
method in one padded gather and one batched attention, other rows one by one.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_halluguard.engine import runtime as rt
from vllm_halluguard.engine.cpu_cache import gather_kv, gather_kv_batched, learn_layout, write_kv
from vllm_halluguard.engine.dispatch import run_methods
from vllm_halluguard.engine.hooks import ensure_runner_hook
from vllm_halluguard.engine.layer import LayerCall

_layer_index = functools.lru_cache(maxsize=None)(extract_layer_index)


class HGCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata plus this step's view of the mitigated rows (``metadata.hg``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ensure_runner_hook()

    def build(
        self, common_prefix_len, common_attn_metadata, fast_build: bool = False
    ) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        runtime = rt.current()
        meta.hg = runtime.view_for(common_attn_metadata.num_reqs) if runtime is not None else None
        if meta.hg is not None:  # host-side spans, once per step rather than once per layer
            meta.hg_spans = (meta.query_start_loc.tolist(), meta.seq_lens.tolist())
        return meta


class HGCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        view = getattr(attn_metadata, "hg", None)
        if view is None or self.attn_type != AttentionType.DECODER:
            return out
        n = attn_metadata.num_actual_tokens
        bs, two_hs = kv_cache.shape[2:]
        layout = learn_layout(layer.isa, kv_cache.dtype, bs, two_hs // 2)
        block_table = attn_metadata.block_table

        def gather(row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_kv(kv_cache, block_table[row], seq_len, layout)

        def gather_batch(rows: list[int], seq_lens: list[int]) -> tuple[torch.Tensor, ...]:
            return gather_kv_batched(kv_cache, block_table, rows, seq_lens, layout)

        def write(slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            write_kv(kv_cache, k, v, slots, layer.isa, self.kv_cache_dtype)

        call = LayerCall(
            layer=_layer_index(layer.layer_name),
            scale=self.scale,
            query=query[:n],
            output=output[:n].view(n, self.num_heads, self.head_size),
            query_start_loc=attn_metadata.hg_spans[0],
            seq_lens=attn_metadata.hg_spans[1],
            slot_mapping=attn_metadata.slot_mapping[:n],
            runtime=rt.current(),
            gather=gather,
            write=write,
            gather_batch=gather_batch,
        )
        run_methods(call, view)
        return out


class HGCPUAttentionBackend(CPUAttentionBackend):
    """Same name, layouts and kernels as ``CPU_ATTN``; per-request methods on top."""

    @staticmethod
    def get_impl_cls() -> type[HGCPUAttentionImpl]:
        return HGCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HGCPUMetadataBuilder]:
        return HGCPUMetadataBuilder
