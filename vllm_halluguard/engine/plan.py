"""A step's partition of the batch: which rows the native kernel computes in each layer, and how.

Built once per step by the wrapped metadata builder (:mod:`vllm_halluguard.engine.backends`) from each
mitigated row's :class:`~vllm_halluguard.engine.base.Route`:

* rows whose route has per-head ``sinks`` form one native **sink lane** per ``sink_key`` (the native
  kernel with those sinks, in every layer; without them outside ``sink_layers``);
* in each layer, the rows some route reworks there are left out of the native kernel and computed by
  their method (torch) or by the project's Triton kernel (**rework lane**);
* every other row, plain rows included, goes to the native kernel: the whole batch with the native
  metadata when nothing is left out, else a sub-batch.

A sub-batch's metadata is the native builder's own, built from vLLM's common metadata restricted to
its rows (:func:`sub_common`), so the partition works the same over every native backend. A step
without mitigated rows never gets here: the builder returns the native metadata unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch

from vllm_halluguard.engine.base import Backend, Route, RowSpan
from vllm_halluguard.engine.registry import method_of
from vllm_halluguard.engine.state import Row, StepView, current

#: Set to 1 to compare, in every mitigated step, the native rows' outputs with the native kernel's over
#: the whole batch (:func:`vllm_halluguard.engine.execute.run_layer`; tests). They are bit-identical only
#: where vLLM's kernel is batch-invariant (:func:`vllm_halluguard.engine.execute.native_exact`).
VERIFY_ENV = "HALLUGUARD_VERIFY_NATIVE"
#: ``triton`` makes the CPU engine rework mitigated rows with the Triton kernel (interpreted, with
#: ``TRITON_INTERPRET=1``) instead of the torch path: the GPU code path, testable on CPU.
ATTENTION_ENV = "HALLUGUARD_ATTENTION"


def rework_engine() -> str:
    """``"kernel"`` (the project's Triton kernel) on GPUs or in CPU test mode, else ``"torch"``."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "kernel"
    choice = os.environ.get(ATTENTION_ENV, "native")
    if choice not in ("native", "triton"):
        raise ValueError(f"{ATTENTION_ENV} must be 'native' or 'triton', got {choice!r}")
    return "kernel" if choice == "triton" else "torch"


#: A sub-batch's tokens in the flat batch: a slice when they are contiguous, else an index tensor.
Tokens: TypeAlias = slice | torch.Tensor


@dataclass
class SubBatch:
    """Some rows of the batch (ascending) and the native metadata of just those rows."""

    rows: list[int]
    tokens: Tokens
    num_tokens: int
    meta: Any = None
    #: Kernel lane only: the rows' query starts, sequence lengths and block table (device tensors).
    query_start_loc: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None


@dataclass
class SinkLane:
    """Rows the native kernel computes with per-head sink logits ``sinks [Hq]`` (fp32)."""

    batch: SubBatch
    sinks: torch.Tensor
    layers: frozenset[int] | None


@dataclass
class LayerPlan:
    """One layer: the native part (``None`` = the whole batch) and the reworked rows."""

    native: SubBatch | None
    rework: tuple[Row, ...] = ()
    kernel: SubBatch | None = None


@dataclass
class StepPlan:
    """The partition of one step (the metadata our backends hand to their impl)."""

    view: StepView
    query_start_loc: list[int]
    seq_lens: list[int]
    num_actual_tokens: int
    default: LayerPlan
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    sink_lanes: list[SinkLane] = field(default_factory=list)
    #: The native metadata of the whole batch (set when some layer runs the whole batch natively).
    full: Any = None
    #: The batch's block table and slot mapping (vLLM's common metadata).
    block_table: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    #: The methods' rows of this step, by method name, and the batch indices of the sink lanes' rows.
    by_method: dict[str, list[Row]] = field(default_factory=dict)
    in_sink_lanes: frozenset[int] = frozenset()

    def layer(self, index: int) -> LayerPlan:
        return self.layers.get(index, self.default)


def seq_lens_cpu(cm: Any) -> list[int]:
    """Host copy of the batch's sequence lengths (the runner's exact CPU copy when it has one)."""
    bound = getattr(cm, "seq_lens_cpu_upper_bound", None)  # exact without speculative decoding
    if bound is not None:
        return bound[: cm.num_reqs].tolist()
    return cm.seq_lens[: cm.num_reqs].cpu().tolist()


def _tokens(rows: list[int], qsl: list[int], device: torch.device) -> tuple[Tokens, int]:
    spans = [(qsl[r], qsl[r + 1]) for r in rows]
    n = sum(hi - lo for lo, hi in spans)
    if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return slice(spans[0][0], spans[0][0] + n), n
    return torch.cat([torch.arange(lo, hi) for lo, hi in spans]).to(device), n


def sub_common(cm: Any, rows: list[int], tokens: Tokens, num_tokens: int) -> Any:
    """vLLM's ``CommonAttentionMetadata`` of ``rows`` only (ascending batch indices)."""
    device = cm.query_start_loc.device
    qsl_cpu = cm.query_start_loc_cpu
    index_cpu = torch.tensor(rows, dtype=torch.long)
    index = index_cpu.to(device)
    lens = (qsl_cpu[1:] - qsl_cpu[:-1])[index_cpu]
    sub_qsl_cpu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(qsl_cpu.dtype)

    def per_request(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[index.to(x.device)]
        return x[rows]  # numpy

    changes: dict[str, Any] = {
        "query_start_loc": sub_qsl_cpu.to(device, non_blocking=True),
        "query_start_loc_cpu": sub_qsl_cpu,
        "seq_lens": cm.seq_lens[index],
        "num_reqs": len(rows),
        "num_actual_tokens": num_tokens,
        "max_query_len": int(lens.max()),
        "block_table_tensor": cm.block_table_tensor[index],
        "slot_mapping": cm.slot_mapping[tokens],
        "causal": per_request(cm.causal) if isinstance(cm.causal, torch.Tensor) else cm.causal,
        "logits_indices_padded": None,
        "num_logits_indices": None,
        "max_logits_per_req": None,
        "positions": None if cm.positions is None else cm.positions[tokens],
        "mm_req_doc_ranges": _remap(cm.mm_req_doc_ranges, rows),
        "_num_computed_tokens_cache": None,
        "_token_to_req_indices_cache": None,
    }
    for name in (
        "encoder_seq_lens",
        "encoder_seq_lens_cpu",
        "dcp_local_seq_lens",
        "dcp_local_seq_lens_cpu_upper_bound",
        "seq_lens_cpu_upper_bound",
        "is_prefilling",
        "req_idx",
        "rswa_prefix_lens",
        "replayssm_decode_base_cpu",
    ):
        if hasattr(cm, name):
            changes[name] = per_request(getattr(cm, name))
    known = {f.name for f in dataclasses.fields(cm)}
    return dataclasses.replace(cm, **{k: v for k, v in changes.items() if k in known})


def _remap(ranges: dict[int, Any] | None, rows: list[int]) -> dict[int, Any] | None:
    if not ranges:
        return ranges
    return {new: ranges[old] for new, old in enumerate(rows) if old in ranges}


def build_plan(
    build: Callable[[int, Any], Any],
    common_prefix_len: int,
    cm: Any,
    view: StepView,
    backend: Backend,
    stats: dict[str, int] | None = None,
    verify: bool = False,
) -> StepPlan | Any:
    """Partition the step ``view`` of batch ``cm``; ``build(prefix_len, common)`` is the native builder.

    A step none of whose rows is reworked, in a sink lane or observed by its method gets vLLM's own
    metadata (``build(common_prefix_len, cm)``), as a plain step does.
    """
    qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
    seq_lens = seq_lens_cpu(cm)
    device = cm.query_start_loc.device
    routes: dict[int, Route] = {}
    by_method: dict[str, list[Row]] = {}
    for row in view.rows:
        span = RowSpan(qsl[row.index], qsl[row.index + 1], seq_lens[row.index])
        method = method_of(row.request.config)
        route = routes[row.index] = method.route(row, span, backend)
        if (route.rework and not backend.kernel) or method.observes(row, span, backend):
            by_method.setdefault(method.name, []).append(row)
    busy = by_method or any(route.rework or route.sinks is not None for route in routes.values())
    if not busy and not verify:
        return build(common_prefix_len, cm)
    rows_by_index = {row.index: row for row in view.rows}

    def sub(rows: list[int]) -> SubBatch:
        tokens, n = _tokens(rows, qsl, device)
        return SubBatch(rows, tokens, n, build(0, sub_common(cm, rows, tokens, n)))

    sink_groups: dict[Hashable, list[int]] = {}
    for index, route in routes.items():
        if route.sinks is not None:
            sink_groups.setdefault(route.sink_key, []).append(index)
    lanes = []
    for rows in sink_groups.values():
        route = routes[rows[0]]
        assert route.sinks is not None
        lanes.append(SinkLane(sub(sorted(rows)), route.sinks.to(device), route.sink_layers))
        counter = f"{method_of(rows_by_index[rows[0]].request.config).name}_native_rows"
        if stats is not None and counter in stats:
            stats[counter] += len(rows)
    in_lanes = frozenset(i for rows in sink_groups.values() for i in rows)

    plan = StepPlan(view, qsl, seq_lens, int(qsl[-1]), LayerPlan(None), sink_lanes=lanes, by_method=by_method)
    plan.block_table, plan.slot_mapping = cm.block_table_tensor, cm.slot_mapping
    plan.in_sink_lanes = in_lanes
    cache: dict[frozenset[int], LayerPlan] = {}

    def layer_plan(rework: frozenset[int]) -> LayerPlan:
        if rework in cache:
            return cache[rework]
        out = rework | in_lanes
        rows = [i for i in range(cm.num_reqs) if i not in out]
        if not out:
            native = None
            if plan.full is None:
                plan.full = build(common_prefix_len, cm)
        else:
            native = sub(rows) if rows else SubBatch([], slice(0, 0), 0)
        lp = LayerPlan(native, tuple(rows_by_index[i] for i in sorted(rework)))
        if rework and backend.kernel:
            lp.kernel = _kernel_batch(sorted(rework), qsl, seq_lens, cm, device)
        cache[rework] = lp
        return lp

    per_layer: dict[int, set[int]] = {}
    for index, route in routes.items():
        for layer in route.rework:
            per_layer.setdefault(layer, set()).add(index)
    plan.layers = {layer: layer_plan(frozenset(rows)) for layer, rows in per_layer.items()}
    if len(plan.layers) < backend.num_layers:  # some layer reworks nothing
        plan.default = layer_plan(frozenset())
    if plan.full is None and verify:
        plan.full = build(common_prefix_len, cm)
    return plan


def _kernel_batch(
    rows: list[int], qsl: list[int], seq_lens: list[int], cm: Any, device: torch.device
) -> SubBatch:
    """The reworked rows as the Triton kernel's varlen batch (built once per step and rework set)."""
    tokens, n = _tokens(rows, qsl, device)
    lens = torch.tensor([qsl[r + 1] - qsl[r] for r in rows])
    starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return SubBatch(
        rows,
        tokens,
        n,
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor([seq_lens[r] for r in rows], dtype=torch.int32).to(device),
        block_table=cm.block_table_tensor[torch.tensor(rows, device=cm.block_table_tensor.device)].to(
            torch.int32
        ),
    )


class BuilderMixin:
    """Metadata builder: native metadata for plain steps, a :class:`StepPlan` for mitigated ones."""

    _hg_native_sinks: bool = False

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # type: ignore[call-arg]  # a mixin
        from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

        from vllm_halluguard.engine.runners import ensure_runner_hook

        ensure_runner_hook()
        self._hg_decoder = isinstance(kv_cache_spec, FullAttentionSpec) and not isinstance(
            kv_cache_spec, MLAAttentionSpec
        )
        self._hg_kernel = rework_engine() == "kernel"
        self._hg_num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        parent = super().build  # type: ignore[misc]  # a mixin: vLLM's builder follows in the MRO
        runtime = current()
        cm = common_attn_metadata
        view = runtime.view_for(cm.num_reqs) if runtime is not None and self._hg_decoder else None
        if view is None:
            return parent(common_prefix_len, cm, fast_build)
        backend = Backend(
            kernel=self._hg_kernel,
            native_sinks=self._hg_native_sinks and not isinstance(cm.causal, torch.Tensor),
            num_layers=runtime.num_layers,
            num_heads=self._hg_num_heads,
        )
        verify = os.environ.get(VERIFY_ENV) == "1"
        # A plan builds several metadata per step. ``fast_build`` keeps each self-contained: FlashAttention
        # 3 otherwise copies its ahead-of-time schedule into one persistent buffer (for full CUDA graphs,
        # which mitigated steps do not use), so every earlier build would read the last one's schedule.
        del fast_build
        return build_plan(lambda prefix, common: parent(prefix, common, True), common_prefix_len, cm,
                          view, backend, runtime.stats, verify)  # fmt: skip
