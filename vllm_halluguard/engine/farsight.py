"""FarSight in the engine: modes B (per-head sink on every row) and C (sink on prompt rows only).

Both are attention with a per-row, per-head sink logit ``log R``; the math is
:mod:`vllm_halluguard.methods.farsight`, the attention the shared torch reference (single-token rows
of a layer call together in :func:`apply_batch`, other rows one by one in :func:`apply`).
Mode B's sink is one constant per head for every token, so where the native kernel takes per-head
sinks (vLLM's ``s_aux``, FlashAttention's sinks) those rows run natively, one sub-batch per config.
With the Triton kernel, the other rows get their per-token sinks in the kernel's launch.
Under tensor parallelism each rank takes the sinks of its own heads (the ALiBi slope of head ``h`` is
``2^(-8(h+1)/H)`` over all ``H`` heads).
"""

from __future__ import annotations

import functools
from typing import cast

import torch

from vllm_halluguard.engine.base import NATIVE, Backend, EngineMethod, Route, RowSpan
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import Row
from vllm_halluguard.engine.tp import head_slice
from vllm_halluguard.kernels.reference import attention_rows, attention_rows_padded
from vllm_halluguard.methods.farsight import FarSightConfig, row_log_r, sink_logits


def steady_sinks(cfg: FarSightConfig, num_heads: int) -> torch.Tensor:
    """Mode B's sink logits ``[H]`` of this rank's ``num_heads`` query heads."""
    total, heads = head_slice(num_heads)
    return _steady_sinks(cfg, total)[heads]


@functools.lru_cache(maxsize=64)
def _steady_sinks(cfg: FarSightConfig, num_heads: int) -> torch.Tensor:
    """Mode B's per-head sink logits ``[H]`` of all heads (a pure function of the frozen config)."""
    return sink_logits(num_heads, cfg.sigma, cfg.alibi, cfg.progressive_c)


def row_sinks(
    cfg: FarSightConfig, positions: torch.Tensor, prompt_len: int, num_heads: int
) -> torch.Tensor | None:
    """Sink logits ``[n, H]`` for tokens at ``positions`` of a request, or ``None`` for a no-op config
    (``num_heads``: this rank's query heads; the ALiBi slopes depend on the head's global index). Mode C
    gives ``-inf`` (no sink) at generated positions; callers skip rows without a prompt token (from their
    host spans: nothing is read from ``positions``)."""
    if cfg.is_noop():
        return None
    if cfg.mode == "B":
        return steady_sinks(cfg, num_heads).expand(len(positions), -1)
    prompt = positions < prompt_len  # mode C: registers over the prompt, for prompt rows only
    length = torch.full_like(positions, prompt_len)
    total, heads = head_slice(num_heads)
    log_r = row_log_r(positions, length, total, cfg.sigma, cfg.alibi, cfg.progressive)[heads].T  # [n, H]
    return torch.where(prompt[:, None], log_r, torch.full_like(log_r, float("-inf")))


def apply(call: LayerCall, row: Row) -> None:
    """Recompute this row's attention output with its FarSight sinks (in place in ``call.output``)."""
    cfg = cast(FarSightConfig, row.request.config)
    if cfg.layers is not None and call.layer not in cfg.layers:
        return
    start, end, seq_len = call.span(row)
    if cfg.mode == "C" and seq_len - (end - start) >= row.request.prompt_len:
        return  # mode C: generated tokens carry no sink
    positions = call.positions(row)
    sinks = row_sinks(cfg, positions, row.request.prompt_len, call.query.shape[1])
    if sinks is None:
        return
    k, v = call.gather(row.index, seq_len)
    out, _, _ = attention_rows(call.query[start:end], k, v, call.scale, positions, sinks)
    call.output[start:end] = out


def apply_batch(call: LayerCall, rows: list[Row]) -> None:
    """:func:`apply` for single-token rows, all in one padded gather and one batched attention."""
    hq = call.query.shape[1]
    todo: list[tuple[Row, int, int]] = []
    sinks = []
    for row in rows:
        cfg = cast(FarSightConfig, row.request.config)
        if cfg.layers is not None and call.layer not in cfg.layers:
            continue
        start, _, seq_len = call.span(row)
        prompt_len = row.request.prompt_len
        if cfg.mode == "C" and seq_len - 1 >= prompt_len:
            continue  # mode C: generated tokens carry no sink (row_sinks would give None)
        row_sink = row_sinks(cfg, torch.tensor([seq_len - 1]), prompt_len, hq)
        if row_sink is None:
            continue
        todo.append((row, start, seq_len))
        sinks.append(row_sink)
    if not todo:
        return
    assert call.gather_batch is not None
    k, v, valid = call.gather_batch([row.index for row, _, _ in todo], [seq_len for _, _, seq_len in todo])
    starts = torch.tensor([start for _, start, _ in todo])
    out, _, _ = attention_rows_padded(call.query[starts], k, v, call.scale, valid, torch.cat(sinks))
    call.output[starts] = out


class FarSightEngine(EngineMethod):
    """FarSight: a sink logit per row and head (mode B: steady, natively; mode C: prompt rows)."""

    name = "farsight"
    batched = True
    tensor_parallel = True  # per-head sinks of the rank's own heads; no cross-head decision
    counters = ("farsight_native_rows",)

    def route(self, row: Row, span: RowSpan, backend: Backend) -> Route:
        cfg = cast(FarSightConfig, row.request.config)
        if cfg.is_noop():
            return NATIVE
        layers = frozenset(cfg.layers) if cfg.layers is not None else frozenset(range(backend.num_layers))
        if cfg.mode == "B":
            if backend.native_sinks:
                sinks = steady_sinks(cfg, backend.num_heads).float().contiguous()
                return Route(sinks=sinks, sink_key=cfg, sink_layers=None if cfg.layers is None else layers)
            return Route(rework=layers)
        if span.first_position >= row.request.prompt_len:
            return NATIVE  # mode C: generated tokens carry no sink
        return Route(rework=layers)

    def observes(self, row: Row, span: RowSpan, backend: Backend) -> bool:
        return False  # its only work is computing the rows it reworks

    def needs_attention(self, row: Row, span: RowSpan) -> bool:
        """Mode B: every row; mode C: rows with prompt tokens (generated tokens carry no sink)."""
        cfg = cast(FarSightConfig, row.request.config)
        if cfg.is_noop():
            return False
        return cfg.mode == "B" or span.first_position < row.request.prompt_len

    apply = staticmethod(apply)
    apply_batch = staticmethod(apply_batch)

    def kernel_args_static(self, row: Row) -> bool:
        return True  # a function of the config, the row's positions and its prompt length

    def kernel_args(self, call: LayerCall, row: Row) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        cfg = cast(FarSightConfig, row.request.config)
        start, end, seq_len = call.span(row)
        first, heads = seq_len - (end - start), call.query.shape[1]
        return _kernel_sinks(cfg, first, seq_len, row.request.prompt_len, heads), None

    def kernel_mask(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        return None


@functools.lru_cache(maxsize=256)
def _kernel_sinks(
    cfg: FarSightConfig, first: int, seq_len: int, prompt_len: int, num_heads: int
) -> torch.Tensor | None:
    """:func:`row_sinks` of the tokens ``first:seq_len`` (the same for every layer of a step)."""
    if cfg.mode == "C" and first >= prompt_len:
        return None  # mode C: generated tokens carry no sink
    return row_sinks(cfg, torch.arange(first, seq_len), prompt_len, num_heads)
