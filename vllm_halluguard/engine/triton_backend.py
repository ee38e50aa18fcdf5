"""Triton attention backend with per-request methods in the kernel (GPU; CPU test mode).

One launch of :func:`vllm_halluguard.kernels.triton_attention.paged_attention_into` serves the
whole batch: FarSight rows carry per-row, per-head sink logits (``-inf`` for plain rows, so plain rows
are plain attention), and layers that smooth a KVSmooth row ask the kernel for each row's exact
entropy, from which :func:`vllm_halluguard.engine.kvsmooth.smooth` updates the cache slot. PruneHal
rows are reworked after the kernel by the same torch path as on CPU (its key mask is not in the
kernel's launch yet).

It uses no vLLM Triton kernel (vLLM's are disabled on its CPU build), so the same builder, impl
and kernel run on a GPU and, for tests, inside the CPU engine with ``TRITON_INTERPRET=1``
(``HALLUGUARD_ATTENTION=triton``, see :mod:`vllm_halluguard.engine.hooks`).

Cache: vLLM's logical per-layer shape ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``;
K is ``[..., :head_size]`` and V ``[..., head_size:]`` of each token, read through strided views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_halluguard.engine import farsight, kvsmooth
from vllm_halluguard.engine import runtime as rt
from vllm_halluguard.engine.dispatch import run_methods
from vllm_halluguard.engine.hooks import ensure_runner_hook
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.runtime import Row, StepView


@dataclass
class HGTritonMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [B+1] int32
    query_start_loc_cpu: list[int]
    seq_lens: torch.Tensor  # [B] int32
    seq_lens_cpu: list[int]
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T]
    hg: StepView | None = None
    #: FarSight sink logits ``[T, Hq]`` (``-inf`` = none) and, per decoder layer, which tokens use them.
    sinks: torch.Tensor | None = None
    sink_layers: dict[int, torch.Tensor] | None = None
    #: KVSmooth rows of this step (their layers are checked per call).
    kvsmooth_rows: tuple[Row, ...] = ()
    #: Rows of methods the kernel does not implement (PruneHal): reworked by the torch path.
    torch_rows: tuple[Row, ...] = ()


class HGTritonMetadataBuilder(AttentionMetadataBuilder[HGTritonMetadata]):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        ensure_runner_hook()

    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> HGTritonMetadata:
        cm = common_attn_metadata
        qsl_cpu = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.to(torch.int32)
        meta = HGTritonMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc.to(torch.int32),
            query_start_loc_cpu=qsl_cpu,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.cpu().tolist(),
            block_table=cm.block_table_tensor.to(torch.int32),
            slot_mapping=cm.slot_mapping,
        )
        runtime = rt.current()
        view = runtime.view_for(cm.num_reqs) if runtime is not None else None
        if view is not None:
            meta.hg = view
            self._prepare_methods(meta, view)
        return meta

    def _prepare_methods(self, meta: HGTritonMetadata, view: StepView) -> None:
        """Per-step tensors shared by every layer: FarSight sinks and the KVSmooth rows."""
        n, device = meta.num_actual_tokens, meta.query_start_loc.device
        sinks = None
        sink_layers: dict[int, torch.Tensor] = {}
        for row in view.rows:
            cfg = row.request.config
            start, end = meta.query_start_loc_cpu[row.index], meta.query_start_loc_cpu[row.index + 1]
            if cfg.name == "kvsmooth":
                meta.kvsmooth_rows += (row,)
                continue
            if cfg.name != "farsight":  # no kernel support yet: the shared torch path after the kernel
                meta.torch_rows += (row,)
                continue
            seq_len = meta.seq_lens_cpu[row.index]
            positions = torch.arange(seq_len - (end - start), seq_len)
            row_sinks = farsight.row_sinks(cfg, positions, row.request.prompt_len, self.num_heads)
            if row_sinks is None:
                continue
            if sinks is None:
                sinks = torch.full((n, self.num_heads), float("-inf"))
            sinks[start:end] = row_sinks
            for layer in cfg.layers if cfg.layers is not None else range(self._num_layers()):
                mask = sink_layers.setdefault(layer, torch.zeros(n, dtype=torch.bool))
                mask[start:end] = True
        if sinks is not None:
            meta.sinks = sinks.to(device)
            meta.sink_layers = {k: v.to(device) for k, v in sink_layers.items()}

    def _num_layers(self) -> int:
        return self.vllm_config.model_config.hf_config.get_text_config().num_hidden_layers


def _split_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[NB, Hkv, BS, 2D]`` -> K and V views ``[NB, BS, Hkv, D]`` (no copy)."""
    return (
        kv_cache[..., :head_size].permute(0, 2, 1, 3),
        kv_cache[..., head_size:].permute(0, 2, 1, 3),
    )


class HGTritonImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap,
            "sinks": sinks,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        used = [k for k, v in unsupported.items() if v]
        if used or attn_type != AttentionType.DECODER or kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"halluguard Triton attention supports plain decoder attention only (got {used}, "
                f"attn_type={attn_type}, kv_cache_dtype={kv_cache_dtype})"
            )
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.attn_type = attn_type
        self.kv_cache_dtype = kv_cache_dtype

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        k_cache, v_cache = _split_cache(kv_cache, self.head_size)
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        block_size = k_cache.shape[1]
        blocks, offsets = slots // block_size, slots % block_size
        n = slot_mapping.shape[0]
        k_cache[blocks, offsets] = key[:n][valid].to(k_cache.dtype)
        v_cache[blocks, offsets] = value[:n][valid].to(v_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        from vllm_halluguard.kernels.triton_attention import paged_attention_into

        if attn_metadata is None:  # profiling / warm-up
            return output
        meta: HGTritonMetadata = attn_metadata
        n = meta.num_actual_tokens
        k_cache, v_cache = _split_cache(kv_cache, self.head_size)
        layer_idx = extract_layer_index(layer.layer_name)
        sinks = None
        if meta.sinks is not None and layer_idx in meta.sink_layers:
            sinks = torch.where(meta.sink_layers[layer_idx][:, None], meta.sinks, float("-inf"))
        call = self._layer_call(layer_idx, query[:n], output, kv_cache, meta, k_cache, v_cache)
        smoothing = [
            (r, p) for r in meta.kvsmooth_rows if (p := kvsmooth.decode_position(call, r)) is not None
        ]
        entropy = (
            torch.empty(n, self.num_heads, dtype=torch.float32, device=query.device) if smoothing else None
        )
        lse = torch.empty_like(entropy) if smoothing else None
        paged_attention_into(
            call.output,
            lse,
            entropy,
            query[:n],
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_table,
            self.scale,
            sinks=sinks,
        )
        if meta.torch_rows:
            run_methods(call, StepView(meta.hg.num_reqs, meta.torch_rows))
        for row, pos in smoothing:
            token = meta.query_start_loc_cpu[row.index]
            if row.request.config.head_reduce != "mean_entropy":  # needs the probabilities: torch path
                kvsmooth.apply(call, row)
                continue
            z = entropy[token].mean().reshape(1)
            prev = self._read_slot(k_cache, v_cache, meta.block_table[row.index], pos - 1)
            cur = self._read_slot(k_cache, v_cache, meta.block_table[row.index], pos)
            kvsmooth.smooth(call, row, z, prev, cur)
        return output

    @staticmethod
    def _read_slot(k_cache, v_cache, block_row, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = k_cache.shape[1]
        block = int(block_row[pos // block_size])
        return k_cache[block, pos % block_size], v_cache[block, pos % block_size]

    def _layer_call(self, layer_idx, query, output, kv_cache, meta, k_cache, v_cache) -> LayerCall:
        from vllm_halluguard.kernels.paged import gather_kv, write_kv

        n = meta.num_actual_tokens

        def gather(row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_kv(k_cache, v_cache, meta.block_table[row], seq_len)

        def write(slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            write_kv(k_cache, v_cache, k, v, slots)

        return LayerCall(
            layer=layer_idx,
            scale=self.scale,
            query=query,
            output=output[:n].view(n, self.num_heads, self.head_size),
            query_start_loc=meta.query_start_loc_cpu,
            seq_lens=meta.seq_lens_cpu,
            slot_mapping=meta.slot_mapping[:n],
            runtime=rt.current(),
            gather=gather,
            write=write,
        )


class HGTritonBackend(AttentionBackend):
    """Registered over ``CPU_ATTN`` in CPU test mode, as ``CUSTOM`` on GPUs."""

    forward_includes_kv_cache_update: ClassVar[bool] = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        from vllm.platforms import current_platform

        # vLLM looks the name up in its backend enum: keep the member we are registered under.
        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_impl_cls() -> type[HGTritonImpl]:
        return HGTritonImpl

    @staticmethod
    def get_builder_cls() -> type[HGTritonMetadataBuilder]:
        return HGTritonMetadataBuilder
