"""CPU attention backend with per-request methods (registered over vLLM's ``CPU_ATTN``).

Plain rows use vLLM's native CPU kernel unchanged: the impl first runs the native kernel on the whole
batch, then, only when the step has mitigated rows, reworks them:

* FarSight mode B rows (a constant sink logit per head) are rerun through the same native kernel,
  one call per config with the sinks as its ``s_aux`` (:class:`SinkBatch`, built once per step);
* every other method reworks its rows through the torch path over the paged cache
  (:mod:`vllm_halluguard.engine.cpu_cache`): single-token rows of a method in one padded gather and
  one batched attention, other rows one by one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_halluguard.engine import farsight
from vllm_halluguard.engine import runtime as rt
from vllm_halluguard.engine.cpu_cache import (
    gather_kv,
    gather_kv_batched,
    gather_slots,
    learn_layout,
    write_kv,
)
from vllm_halluguard.engine.dispatch import run_methods
from vllm_halluguard.engine.hooks import ensure_runner_hook
from vllm_halluguard.engine.layer import LayerCall

_layer_index = functools.lru_cache(maxsize=None)(extract_layer_index)


@dataclass
class SinkBatch:
    """FarSight-B rows of one config as a sub-batch for the native kernel (shared by every layer)."""

    sinks: torch.Tensor  # [Hq] fp32 sink logits
    layers: frozenset[int] | None  # the config's layers (None: all)
    tokens: torch.Tensor  # [n] the rows' tokens in the flat batch
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor


class HGCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata plus this step's mitigated rows: ``metadata.hg`` (the view of the rows the
    torch path reworks) and ``metadata.hg_sinks`` (one :class:`SinkBatch` per FarSight-B config)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ensure_runner_hook()

    def build(
        self, common_prefix_len, common_attn_metadata, fast_build: bool = False
    ) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        runtime = rt.current()
        meta.hg = runtime.view_for(common_attn_metadata.num_reqs) if runtime is not None else None
        meta.hg_sinks = []
        if meta.hg is not None:  # host-side spans, once per step rather than once per layer
            meta.hg_spans = (meta.query_start_loc.tolist(), meta.seq_lens.tolist())
            decoder = not (self.is_cross_attention or self.is_encoder_only_attention)
            native = decoder and meta.dynamic_causal is None
            groups = farsight.steady_groups(meta.hg.rows) if native else {}
            if groups:
                done = {row.index for rows in groups.values() for row in rows}
                meta.hg_sinks = [self._sink_batch(meta, cfg, rows) for cfg, rows in groups.items()]
                meta.hg = rt.StepView(meta.hg.num_reqs, tuple(r for r in meta.hg.rows if r.index not in done))
                runtime.stats["farsight_native_rows"] += len(done)
        return meta

    def _sink_batch(self, meta: CPUAttentionMetadata, cfg: Any, rows: list[rt.Row]) -> SinkBatch:
        starts, _ = meta.hg_spans
        index = torch.tensor([row.index for row in rows])
        spans = [torch.arange(starts[row.index], starts[row.index + 1]) for row in rows]
        lengths = torch.tensor([len(span) for span in spans], dtype=meta.query_start_loc.dtype)
        query_start_loc = torch.nn.functional.pad(lengths.cumsum(0, dtype=lengths.dtype), (1, 0))
        seq_lens = meta.seq_lens[index].contiguous()
        return SinkBatch(
            sinks=farsight.steady_sinks(cfg, self.num_heads).float().contiguous(),
            layers=None if cfg.layers is None else frozenset(cfg.layers),
            tokens=torch.cat(spans),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=meta.block_table[index].contiguous(),
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(rows),
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                seq_lens=seq_lens,
                dtype=self.dtype,
                query_start_loc=query_start_loc,
                causal=meta.causal,
                sliding_window_size=self.window_size,
                isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
        )


class HGCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return out
        for batch in getattr(attn_metadata, "hg_sinks", ()):
            self._run_with_sinks(layer, query, kv_cache, output, attn_metadata, batch)
        view = getattr(attn_metadata, "hg", None)
        if view is None or not view.rows:
            return out
        n = attn_metadata.num_actual_tokens
        bs, two_hs = kv_cache.shape[2:]
        layout = learn_layout(layer.isa, kv_cache.dtype, bs, two_hs // 2)
        block_table = attn_metadata.block_table

        def gather(row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_kv(kv_cache, block_table[row], seq_len, layout)

        def gather_batch(rows: list[int], seq_lens: list[int], values: bool = True) -> tuple:
            return gather_kv_batched(kv_cache, block_table, rows, seq_lens, layout, values)

        def slots(rows: list[int], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_slots(kv_cache, block_table, rows, positions, layout)

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
            gather_slots=slots,
        )
        run_methods(call, view)
        return out

    def _run_with_sinks(self, layer, query, kv_cache, output, meta, batch: SinkBatch) -> None:
        """Rerun one :class:`SinkBatch`'s rows through the native kernel with their sinks as ``s_aux``."""
        if batch.layers is not None and _layer_index(layer.layer_name) not in batch.layers:
            return
        sinks = batch.sinks
        if self.sinks is not None:  # the model's own sinks: the two dropped masses add up
            sinks = torch.logaddexp(sinks, self.sinks.float())
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        q = query[batch.tokens]
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            scale=self.scale,
            causal=meta.causal,
            alibi_slopes=self.alibi_slopes,
            sliding_window=self.sliding_window,
            block_table=batch.block_table,
            softcap=self.logits_soft_cap,
            scheduler_metadata=batch.scheduler_metadata,
            s_aux=sinks,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output.view(-1, self.num_heads, self.head_size)[batch.tokens] = out


class HGCPUAttentionBackend(CPUAttentionBackend):
    """Same name, layouts and kernels as ``CPU_ATTN``; per-request methods on top."""

    @staticmethod
    def get_impl_cls() -> type[HGCPUAttentionImpl]:
        return HGCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HGCPUMetadataBuilder]:
        return HGCPUMetadataBuilder
