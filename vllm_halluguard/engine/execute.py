"""One attention layer call of a step with mitigated rows (:class:`~vllm_halluguard.engine.plan.StepPlan`).

1. The native kernel computes this layer's native rows: the whole batch with vLLM's metadata when no
   row is reworked here, else the sub-batch of the other rows. Each sink lane runs natively with its
   per-head sink logits (the impl's ``sinks`` attribute, which vLLM's kernels read, set for the call).
2. Reworked rows: on the kernel path, one launch of the project's Triton kernel computes them all
   (per-token sinks and key masks from the methods' ``kernel_args``; LSE and entropy for their
   ``after_kernel``); on the torch path their method computes them in ``run``.
3. Every method then runs over its other rows (statistics, cache edits, SCR's diagnostic map); a
   sink lane's rows only where their method observes them (a composition's other members).

Each mitigated row's attention is computed once per layer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, cast

import torch

from vllm_halluguard.engine.cache_io import cache_io
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.plan import LayerPlan, StepPlan, SubBatch, lane_args, lane_masks
from vllm_halluguard.engine.registry import named
from vllm_halluguard.engine.state import current

logger = logging.getLogger(__name__)


@functools.cache
def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


class ImplMixin:
    """Attention impl: the native forward for plain steps, the partition for mitigated ones."""

    _hg_backend_name: str = ""

    def forward(self, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any, attn_metadata: Any,
                output: Any, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        native = super().forward  # type: ignore[misc]  # a mixin: vLLM's impl follows in the MRO
        if not isinstance(attn_metadata, StepPlan):
            return native(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        return run_layer(
            self, native, layer, query, key, value, kv_cache, attn_metadata, output, args, kwargs
        )


def run_layer(
    impl: Any, native: Any, layer: Any, query: torch.Tensor, key: Any, value: Any, kv_cache: torch.Tensor,
    plan: StepPlan, output: torch.Tensor, args: tuple, kwargs: dict,
) -> torch.Tensor:  # fmt: skip
    """Compute one layer of a mitigated step into ``output`` (see the module docstring)."""
    index = layer_index(layer.layer_name)
    lp = plan.layer(index)
    if lp.native is None:
        native(layer, query, key, value, kv_cache, plan.full, output, *args, **kwargs)
    elif lp.native.num_tokens:
        _native_sub(impl, native, layer, query, key, value, kv_cache, lp.native, output, None, args, kwargs)
    for lane in plan.sink_lanes:
        sinks = lane.sinks if lane.layers is None or index in lane.layers else None
        _native_sub(impl, native, layer, query, key, value, kv_cache, lane.batch, output, sinks, args, kwargs)
    if not lp.rework and (not plan.by_method or index in plan.quiet) and not plan.verify:
        return output  # e.g. a layer where only sink lanes differ from the native kernel, or none observed
    n = plan.num_actual_tokens
    assert plan.slot_mapping is not None  # the builder sets it on every plan
    out3 = (output if output.shape[0] == n else output[:n]).view(n, impl.num_heads, impl.head_size)
    io = _layer_io(impl, kv_cache, plan.block_table, layer)
    call = LayerCall.reading(
        io,
        layer=index,
        scale=impl.scale,
        query=query if query.shape[0] == n else query[:n],
        output=out3,
        query_start_loc=plan.query_start_loc,
        seq_lens=plan.seq_lens,
        slot_mapping=plan.slot_mapping if plan.slot_mapping.shape[0] == n else plan.slot_mapping[:n],
        runtime=current(),
        plan=plan,
    )
    if plan.verify:
        _verify_native(impl, native, layer, query, key, value, kv_cache, plan, lp, output, args, kwargs)
    if lp.rework:
        _check_plain(impl)
        if lp.kernel is not None:
            _kernel_lane(impl, call, lp, lp.kernel, io)
        else:  # torch path: poison, so that a row its method fails to compute cannot pass for computed
            out3.index_fill_(0, _rework_tokens(plan, lp, out3.device), float("nan"))
    for name, rows in lp.observed:  # the kernel lane's rows left out by the builder
        named(name).run(call, rows)
    return output


def _rework_tokens(plan: StepPlan, lp: LayerPlan, device: torch.device) -> torch.Tensor:
    """The flat token indices of ``lp``'s reworked rows, made once per step and layer plan."""
    key = ("rework_tokens", id(lp))
    hit = plan.prepared.get(key)
    if hit is None:
        qsl = plan.query_start_loc
        tokens = [t for row in lp.rework for t in range(qsl[row.index], qsl[row.index + 1])]
        hit = plan.prepared[key] = torch.tensor(tokens, dtype=torch.long, device=device)
    return cast(torch.Tensor, hit)


def _layer_io(impl: Any, kv_cache: torch.Tensor, block_table: torch.Tensor, layer: Any) -> Any:
    """The layer's :class:`~vllm_halluguard.engine.cache_io.CacheIO`, kept on its impl from step to step
    while its cache and the block table's memory and shape stay (its views are made once)."""
    key = (block_table.data_ptr(), tuple(block_table.shape), block_table.dtype)
    kept = getattr(impl, "_hg_io", None)
    if kept is not None and kept[0] is kv_cache and kept[1] == key:
        return kept[2]
    io = cache_io(impl._hg_backend_name, kv_cache, block_table, layer, impl)
    impl._hg_io = (kv_cache, key, io)
    return io


def _native_sub(
    impl: Any, native: Any, layer: Any, query: torch.Tensor, key: Any, value: Any, kv_cache: torch.Tensor,
    sub: SubBatch, output: torch.Tensor, sinks: torch.Tensor | None, args: tuple, kwargs: dict,
) -> None:  # fmt: skip
    """The native kernel on a sub-batch (its rows' tokens), optionally with per-head sink logits."""
    t = sub.tokens
    q = query[t]
    k = key[t] if key is not None else None
    v = value[t] if value is not None else None
    out = output[t] if isinstance(t, slice) else output.new_empty((sub.num_tokens, *output.shape[1:]))
    saved = impl.sinks
    if sinks is not None:
        impl.sinks = native_sinks(impl, sinks if saved is None else torch.logaddexp(sinks, saved.float()))
    try:
        native(layer, q, k, v, kv_cache, sub.meta, out, *args, **kwargs)
    finally:
        impl.sinks = saved
    if not isinstance(t, slice):
        output[t] = out


def native_sinks(impl: Any, sinks: torch.Tensor) -> torch.Tensor:
    """Per-head sink logits in the dtype the native kernel takes: FlashAttention 3's ``mha_fwd`` accepts
    only bf16 ``s_aux`` (vllm-project/flash-attention ``hopper/flash_api.cpp``: "We only support bf16
    dtype for S aux"), whatever the query dtype; the other kernels read fp32."""
    if getattr(impl, "vllm_flash_attn_version", None) == 3:
        return sinks.to(torch.bfloat16).contiguous()
    return sinks


def _check_plain(impl: Any) -> None:
    """The reworked rows' attention is plain causal attention (plus the methods' terms)."""
    window = getattr(impl, "sliding_window", None)
    if (window not in (None, -1) and window != (-1, -1)) or getattr(impl, "alibi_slopes", None) is not None \
            or getattr(impl, "logits_soft_cap", None):  # fmt: skip
        raise NotImplementedError(
            "halluguard methods support plain causal attention layers only (no sliding window, ALiBi "
            "or logit soft-capping)"
        )


def _kernel_lane(impl: Any, call: LayerCall, lp: LayerPlan, sub: SubBatch, io: Any) -> None:
    """The reworked rows in one launch of the Triton kernel, then each method's ``after_kernel``."""
    from vllm_halluguard.kernels.triton_attention import paged_attention_into

    views = io.kernel_views()
    if views is None:
        raise NotImplementedError("this KV-cache page packing cannot be read by the Triton kernel")
    assert sub.query_start_loc is not None and sub.seq_lens is not None and sub.block_table is not None
    device, hq = call.query.device, call.query.shape[1]
    q = call.query[sub.tokens]
    pre = None if call.plan is None else call.plan.kernel_args.get(call.layer)
    if pre is not None:  # made and copied once per step by the builder
        sinks, mask = pre
        if call.layer in call.plan.masks_per_layer:  # PruneHal's masks: made on the device, per layer
            mask = lane_masks(call, lp)
    else:  # a method whose arguments depend on this step's earlier layers (PruneHal's mask)
        sinks, mask, _ = lane_args(call, lp.rework, sub.num_tokens)
        sinks = None if sinks is None else sinks.to(device)
        if mask is not None and mask.device != device:
            mask = mask.to(device)
    if impl.sinks is not None:  # the model's own sinks: the two dropped masses add up
        own = impl.sinks.float()[None]
        sinks = own.expand(sub.num_tokens, -1).contiguous() if sinks is None else torch.logaddexp(sinks, own)
    n = call.query.shape[0]
    # LSE and entropy of every token (the lane's rows filled); with contiguous lane tokens the kernel
    # writes its output, LSE and entropy in place (views), else into its own tensors, then scattered
    lse_all = torch.zeros(2, n, hq, dtype=torch.float32, device=device)
    contiguous = isinstance(sub.tokens, slice)
    if contiguous:
        out, lse, entropy = call.output[sub.tokens], lse_all[0, sub.tokens], lse_all[1, sub.tokens]
    else:
        out = torch.empty_like(q)
        lse, entropy = lse_all.new_empty(sub.num_tokens, hq), lse_all.new_empty(sub.num_tokens, hq)
    paged_attention_into(
        out, lse, entropy, q, views[0], views[1], sub.query_start_loc, sub.seq_lens, sub.block_table,
        impl.scale, sinks=sinks, key_mask=mask,
    )  # fmt: skip
    if not contiguous:
        call.output[sub.tokens] = out
        lse_all[0, sub.tokens], lse_all[1, sub.tokens] = lse, entropy
    call.runtime.stats["kernel_rows"] += len(lp.rework)
    for name, rows in lp.lane:  # grouped by the builder
        named(name).after_kernel(call, rows, lse_all[0], lse_all[1])


def native_exact(backend_name: str) -> bool:
    """Whether vLLM's own kernel promises a row the same bits in any batch, so that the plain rows of a
    mixed step (a sub-batch) must equal a whole-batch pass exactly.

    CPU_ATTN: without its split of a row's keys (``VLLM_CPU_ATTN_SPLIT_KV=0``) or on one thread (tested).
    FLASH_ATTN, TRITON_ATTN: only in vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``: vLLM builds
    every FlashAttention metadata without the ahead-of-time schedule and with ``num_splits=1``, and
    ``unified_attention`` never takes its split 3D kernel). Otherwise FlashAttention 3 picks its split
    count from the batch's shape and a plain row moves by rounding with or without the plugin, as
    between two batch compositions in vLLM. Neither GPU case has run on a GPU."""
    import vllm.envs as envs

    if backend_name == "CPU_ATTN":
        return not envs.VLLM_CPU_ATTN_SPLIT_KV or torch.get_num_threads() == 1
    return bool(envs.VLLM_BATCH_INVARIANT)


def _verify_native(
    impl: Any, native: Any, layer: Any, query: torch.Tensor, key: Any, value: Any, kv_cache: torch.Tensor,
    plan: StepPlan, lp: LayerPlan, output: torch.Tensor, args: tuple, kwargs: dict,
) -> None:  # fmt: skip
    """Count (``native_checked`` / ``native_mismatch`` rows, ``native_max_diff``) whether the native rows
    of this layer equal the native kernel's output over the whole batch, bit for bit. They must where
    vLLM's kernel is batch-invariant (:func:`native_exact`), and a mismatch there is logged as a
    warning; elsewhere a mismatch is vLLM's own batch-composition variance (CPU_ATTN's split of a row's
    keys over threads, FlashAttention 3's split count chosen per batch), there with or without the
    plugin, and is only counted."""
    stats = current().stats
    if plan.full is None or lp.native is None:
        return
    full = torch.empty_like(output)
    native(layer, query, key, value, kv_cache, plan.full, full, *args, **kwargs)
    for r in lp.native.rows:
        lo, hi = plan.query_start_loc[r], plan.query_start_loc[r + 1]
        stats["native_checked"] += 1
        if not torch.equal(output[lo:hi], full[lo:hi]):
            stats["native_mismatch"] += 1
            diff = float((output[lo:hi].float() - full[lo:hi].float()).abs().max())
            stats["native_max_diff"] = max(stats.get("native_max_diff", 0.0), diff)
            if native_exact(impl._hg_backend_name):
                logger.warning(  # not vLLM's variance: the partition (or vLLM's invariance) is at fault
                    "halluguard: a plain row of a mixed step differs from vLLM's whole-batch pass by %.3g "
                    "although %s is batch-invariant in this configuration", diff, impl._hg_backend_name,
                )  # fmt: skip
