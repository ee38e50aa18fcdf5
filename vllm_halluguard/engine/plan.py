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
from vllm_halluguard.engine.cache_io import NATIVE_KEY, native_serves
from vllm_halluguard.engine.guards import VERIFY_ENV
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.registry import method_of, named
from vllm_halluguard.engine.state import DeviceRows, Row, StepView, current, index_runs
from vllm_halluguard.kernels import cpu_native

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
    #: Kernel lane: the reworked rows by method name (:func:`~vllm_halluguard.engine.registry.method_of`),
    #: in order of first row, grouped once per step for every layer's ``after_kernel`` calls.
    lane: tuple[tuple[str, list[Row]], ...] = ()
    #: The rows each method observes in this layer (``run``), by method name: the step's ``by_method``
    #: less the kernel lane's rows, filtered once per step.
    observed: tuple[tuple[str, list[Row]], ...] = ()
    #: Kernel lane: the longest reworked row (the key mask's width), found once per step.
    width: int = 0


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
    #: Kernel path: per batch row, on the device, built once per step (:func:`device_rows`): the flat
    #: index of its last token, its position, and its request's slot and prompt length (-1: plain row).
    rows: DeviceRows | None = None
    #: Kernel path: the rework lane's sinks ``[T, Hq]`` and key mask ``[B, S]`` on the device, by layer,
    #: for the layers whose rows' methods have static kernel arguments (:func:`static_kernel_args`).
    kernel_args: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)
    #: Kernel path: layers of ``kernel_args`` whose sinks are made by the builder but whose key masks are
    #: made in the layer call (on the device, from method state: PruneHal's keep masks).
    masks_per_layer: frozenset[int] = frozenset()
    #: The KV cache's block size (the builder's spec; 0 where unknown).
    block_size: int = 0
    #: Per-step tables the methods build once (:meth:`~vllm_halluguard.engine.base.EngineMethod.
    #: prepare_step`) and read in every layer call, by a key of their choosing.
    prepared: dict[Hashable, Any] = field(default_factory=dict)
    #: Layers where no method's rows are observed (:meth:`~vllm_halluguard.engine.base.EngineMethod.
    #: observed_layers`): those without reworked rows run the native kernel alone.
    quiet: frozenset[int] = frozenset()
    #: ``HALLUGUARD_VERIFY_NATIVE=1`` at the build: every layer also checks the native kernel's rows.
    verify: bool = False

    def layer(self, index: int) -> LayerPlan:
        return self.layers.get(index, self.default)


def device_rows(cm: Any, view: StepView) -> DeviceRows:
    """:class:`DeviceRows` of the step, its request tables sent in a copy of their own."""
    upload = Upload()
    make = queue_device_rows(cm, view, upload)
    return make(upload.send(cm.query_start_loc.device))


def queue_device_rows(cm: Any, view: StepView, upload: Upload) -> Callable[[list[torch.Tensor]], DeviceRows]:
    """:class:`DeviceRows` of the step: the token and position tables from vLLM's device metadata, the
    request tables added to the step's one host-to-device copy (``upload``). Returns the function that
    makes them from the copy's device tensors."""
    n = cm.num_reqs
    device = cm.query_start_loc.device
    slots, prompt_lens = [-1] * n, [-1] * n
    for row in view.rows:
        slots[row.index], prompt_lens[row.index] = row.request.slot, row.request.prompt_len
    part = upload.add(torch.tensor([slots, prompt_lens], dtype=torch.long))

    def make(sent: list[torch.Tensor]) -> DeviceRows:
        table = sent[part]
        return DeviceRows(
            last_token=cm.query_start_loc[1 : n + 1].long() - 1,
            position=cm.seq_lens[:n].long() - 1,
            slot=table[0],
            prompt_len=table[1],
            _arange=torch.arange(n, device=device),
        )

    return make


@dataclass
class Upload:
    """The host tensors a step sends to the device, sent in **one** copy (:meth:`send`): their bytes
    packed into one buffer (each part aligned to 16 bytes), pinned and non-blocking where CUDA is
    available, then viewed back as each part's dtype and shape on the device."""

    parts: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> int:
        """Queue host tensor ``x``; its index in :meth:`send`'s result."""
        self.parts.append(x)
        return len(self.parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        if not self.parts:
            return []
        chunks, spans, offset = [], [], 0
        for x in self.parts:
            raw = x.contiguous().reshape(-1).view(torch.uint8)
            pad = -raw.numel() % 16
            chunks += [raw, raw.new_zeros(pad)] if pad else [raw]
            spans.append((offset, raw.numel()))
            offset += raw.numel() + pad
        flat = torch.cat(chunks)
        if device.type == "cuda" and torch.cuda.is_available():
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        return [
            flat[start : start + size].view(x.dtype).view(x.shape)
            for (start, size), x in zip(spans, self.parts, strict=True)
        ]


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
    arange = torch.arange(qsl[-1], device=device)  # a device op: no host data
    return torch.cat([arange[lo:hi] for lo, hi in spans]), n


#: Per-request fields of vLLM's common metadata that are host copies (indexed with a host index).
_HOST_SUFFIXES = ("_cpu", "_cpu_upper_bound")


def sub_common(
    cm: Any, rows: list[int], tokens: Tokens, num_tokens: int, qsl: list[int] | None = None
) -> Any:
    """vLLM's ``CommonAttentionMetadata`` of ``rows`` only (ascending batch indices; ``qsl``: the host
    query starts, if the caller has them as a list). Device fields are indexed on the device with an index
    made there, host fields with a host index: nothing is copied between them."""
    device = cm.query_start_loc.device
    qsl_cpu = cm.query_start_loc_cpu
    if qsl is None:
        qsl = qsl_cpu[: cm.num_reqs + 1].tolist()
    index_cpu = index_runs(rows, torch.arange(cm.num_reqs))
    index = index_runs(rows, torch.arange(cm.num_reqs, device=device))
    sub_qsl_cpu = torch.nn.functional.pad((qsl_cpu[1:] - qsl_cpu[:-1])[index_cpu].cumsum(0), (1, 0))
    qsl_dev = cm.query_start_loc
    sub_qsl = torch.nn.functional.pad((qsl_dev[1:] - qsl_dev[:-1])[index].cumsum(0), (1, 0))

    def per_request(name: str, x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[index_cpu if name.endswith(_HOST_SUFFIXES) or x.device.type == "cpu" else index]
        return x[rows]  # numpy

    changes: dict[str, Any] = {
        "query_start_loc": sub_qsl.to(qsl_dev.dtype),
        "query_start_loc_cpu": sub_qsl_cpu.to(qsl_cpu.dtype),
        "seq_lens": cm.seq_lens[index],
        "num_reqs": len(rows),
        "num_actual_tokens": num_tokens,
        "max_query_len": max(qsl[r + 1] - qsl[r] for r in rows),
        "block_table_tensor": cm.block_table_tensor[index],
        "slot_mapping": cm.slot_mapping[tokens],
        "causal": per_request("causal", cm.causal) if isinstance(cm.causal, torch.Tensor) else cm.causal,
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
            changes[name] = per_request(name, getattr(cm, name))
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
    block_size: int = 0,
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
        return SubBatch(rows, tokens, n, build(0, sub_common(cm, rows, tokens, n, qsl)))

    sink_groups: dict[Hashable, list[int]] = {}
    for index, route in routes.items():
        if route.sinks is not None:
            sink_groups.setdefault(route.sink_key, []).append(index)
    upload = Upload()  # every host table of the step, in one copy (sent below)
    lanes, lane_sinks = [], []
    for rows in sink_groups.values():
        route = routes[rows[0]]
        assert route.sinks is not None
        lanes.append(SinkLane(sub(sorted(rows)), route.sinks, route.sink_layers))
        lane_sinks.append(upload.add(route.sinks))
        counter = f"{method_of(rows_by_index[rows[0]].request.config).name}_native_rows"
        if stats is not None and counter in stats:
            stats[counter] += len(rows)
    in_lanes = frozenset(i for rows in sink_groups.values() for i in rows)

    plan = StepPlan(view, qsl, seq_lens, int(qsl[-1]), LayerPlan(None, observed=tuple(by_method.items())),
                    sink_lanes=lanes, by_method=by_method)  # fmt: skip
    plan.block_table, plan.slot_mapping = cm.block_table_tensor, cm.slot_mapping
    plan.quiet = _quiet_layers(by_method, backend.num_layers)
    plan.verify = verify
    plan.prepared[NATIVE_KEY] = backend.cpu_native  # the layers' native CPU kernels follow the routes
    plan.block_size = block_size
    make_rows = queue_device_rows(cm, view, upload) if backend.kernel else None
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
            lp.width = max(seq_lens[i] for i in rework)
            lane: dict[str, list[Row]] = {}
            for row in lp.rework:
                lane.setdefault(method_of(row.request.config).name, []).append(row)
            lp.lane = tuple(lane.items())
            kept = ((name, [r for r in rows if r.index not in rework]) for name, rows in by_method.items())
            lp.observed = tuple((name, rows) for name, rows in kept if rows)
        else:
            lp.observed = tuple(by_method.items())
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
    make_args = static_kernel_args(plan, backend, upload) if backend.kernel else None
    sent = upload.send(device)
    for lane, part in zip(lanes, lane_sinks, strict=True):
        lane.sinks = sent[part]
    if make_rows is not None and make_args is not None:
        plan.rows = make_rows(sent)
        plan.kernel_args, plan.masks_per_layer = make_args(sent)
    _prepare(plan)
    return plan


def _quiet_layers(by_method: dict[str, list[Row]], num_layers: int) -> frozenset[int]:
    """The layers none of the step's methods observes its rows in."""
    observed: set[int] = set()
    for name, rows in by_method.items():
        layers = named(name).observed_layers(rows)
        if layers is None:
            return frozenset()
        observed |= layers
    return frozenset(range(num_layers)) - observed


def _prepare(plan: StepPlan) -> None:
    """Each method's per-step tables for the row lists its hooks will be handed in the layer plans: the
    rows it observes (``run``) and the kernel lane's rows it reworks (``after_kernel``)."""
    seen: set[int] = set()
    for lp in (plan.default, *plan.layers.values()):
        if id(lp) in seen:
            continue
        seen.add(id(lp))
        for name, rows in lp.observed:
            named(name).prepare_step(plan, rows, False)
        for name, rows in lp.lane:
            named(name).prepare_step(plan, rows, True)


def lane_args(
    call: LayerCall, rework: tuple[Row, ...], num_tokens: int, part: str = "both"
) -> tuple[Any, Any, tuple]:
    """The kernel lane's sinks ``[num_tokens, Hq]`` and key mask ``[rows, S_max]`` from each row's
    ``kernel_args`` (``None`` where no row has any), where they are made, and the rows' own results (the
    same objects for two layers whose rows returned the same: the builder makes those once).
    ``part="sinks"`` / ``"mask"``: only that one (``kernel_sinks`` / ``kernel_mask``), the other ``None``."""
    hq = call.query.shape[1]
    sinks: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    key: list[Any] = []
    local = 0
    for j, row in enumerate(rework):
        start, end, seq_len = call.span(row)
        method = method_of(row.request.config)
        if part == "both":
            row_sinks, row_mask = method.kernel_args(call, row)
        elif part == "sinks":
            row_sinks, row_mask = method.kernel_sinks(call, row), None
        else:
            row_sinks, row_mask = None, method.kernel_mask(call, row)
        key.append((row_sinks, row_mask))
        if row_sinks is not None:
            if sinks is None:
                sinks = torch.full((num_tokens, hq), float("-inf"))
            sinks[local : local + end - start] = row_sinks
        if row_mask is not None:
            if mask is None:  # where the rows' masks are (PruneHal's: the layer's device), no read back
                width = max(call.seq_lens[r.index] for r in rework)
                mask = torch.ones(len(rework), width, dtype=torch.bool, device=row_mask.device)
            mask[j, :seq_len] = row_mask
        local += end - start
    return sinks, mask, tuple(key)


def lane_masks(call: LayerCall, lp: LayerPlan) -> torch.Tensor | None:
    """The kernel lane's key mask ``[len(lp.rework), lp.width]`` of a layer whose masks are made in the
    layer call (``masks_per_layer``): each method writes its lane rows' masks
    (:meth:`~vllm_halluguard.engine.base.EngineMethod.lane_mask`); ``None`` where no row has one."""
    mask: torch.Tensor | None = None
    for name, rows in lp.lane:
        mask = named(name).lane_mask(call, lp, rows, mask)
    return mask


def _no_cache(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("kernel_args_static methods read no cache")


#: The kernel lane's sinks and key mask by layer (``None``: none), and the layers whose masks are made in
#: the layer call.
KernelArgs: TypeAlias = tuple[dict[int, tuple[torch.Tensor | None, torch.Tensor | None]], frozenset[int]]


def static_kernel_args(
    plan: StepPlan, backend: Backend, upload: Upload
) -> Callable[[list[torch.Tensor]], KernelArgs]:
    """The kernel lane's sinks and masks of every layer whose rows all have static kernel arguments
    (:meth:`~vllm_halluguard.engine.base.EngineMethod.kernel_args_static`), made on the host once per
    step and added to the step's one copy to the device (``upload``); and of the layers whose rows' sinks
    only are static (``kernel_sinks_static``: PruneHal's rows), the sinks the same way, with the layers
    whose masks the layer call makes. Returns the function that makes them from the copy's tensors."""
    stub = LayerCall(
        layer=0, scale=0.0, query=torch.empty(0, backend.num_heads, 0), output=torch.empty(0),
        query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens,
        slot_mapping=torch.empty(0, dtype=torch.long), runtime=current(), gather=_no_cache, write=_no_cache,
    )  # fmt: skip
    per_layer: dict[int, tuple[int, int]] = {}  # layer -> parts of ``upload`` (-1: none)
    made: dict[tuple[int, ...], tuple[int, int]] = {}
    alive: list[Any] = []  # the rows' results stay referenced while their ids key ``made``
    dynamic: set[int] = set()
    for layer in range(backend.num_layers):
        lp = plan.layer(layer)
        if lp.kernel is None:
            continue
        part = "both"
        if not all(method_of(r.request.config).kernel_args_static(r) for r in lp.rework):
            if not all(method_of(r.request.config).kernel_sinks_static(r) for r in lp.rework):
                continue
            part = "sinks"
            dynamic.add(layer)
        stub.layer = layer
        sinks, mask, results = lane_args(stub, lp.rework, lp.kernel.num_tokens, part)
        alive.append(results)
        key = (id(lp), *(id(x) for pair in results for x in pair))
        if key not in made:
            made[key] = (-1 if sinks is None else upload.add(sinks), -1 if mask is None else upload.add(mask))
        per_layer[layer] = made[key]

    def make(sent: list[torch.Tensor]) -> KernelArgs:
        def pick(i: int) -> torch.Tensor | None:
            return sent[i] if i >= 0 else None

        return {layer: (pick(i), pick(j)) for layer, (i, j) in per_layer.items()}, frozenset(dynamic)

    return make


def _kernel_batch(
    rows: list[int], qsl: list[int], seq_lens: list[int], cm: Any, device: torch.device
) -> SubBatch:
    """The reworked rows as the Triton kernel's varlen batch (built once per step and rework set, on the
    device from vLLM's device metadata: no host data is copied)."""
    tokens, n = _tokens(rows, qsl, device)
    index = index_runs(rows, torch.arange(cm.num_reqs, device=device))
    qsl_dev = cm.query_start_loc
    lens = (qsl_dev[1:] - qsl_dev[:-1])[index]
    return SubBatch(
        rows,
        tokens,
        n,
        query_start_loc=torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32),
        seq_lens=cm.seq_lens[index].to(torch.int32),
        block_table=cm.block_table_tensor[index].to(torch.int32),
    )


class BuilderMixin:
    """Metadata builder: native metadata for plain steps, a :class:`StepPlan` for mitigated ones."""

    _hg_native_sinks: bool = False
    #: Most query heads per rank the native kernel takes sinks for (``None``: no limit).
    _hg_sink_heads_max: int | None = None
    _hg_block_size: int = 0  # the KV cache spec's (0: the methods take the layer cache's)
    _hg_cpu_native: bool = False  # the native CPU kernels serve the layers (``Backend.cpu_native``)

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # type: ignore[call-arg]  # a mixin
        from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

        self._hg_decoder = isinstance(kv_cache_spec, FullAttentionSpec) and not isinstance(
            kv_cache_spec, MLAAttentionSpec
        )
        self._hg_kernel = rework_engine() == "kernel"
        if not self._hg_kernel and torch.device(device).type == "cpu":
            cpu_native.warm_up()  # built or loaded at start-up: serving never compiles
            self._hg_cpu_native = native_serves(str(vllm_config.cache_config.cache_dtype))
        self._hg_block_size = int(getattr(kv_cache_spec, "block_size", 0))
        self._hg_num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)

    def _hg_sink_lane(self) -> bool:
        """Whether FarSight mode-B rows run as the native kernel's sink lane: the kernel takes sinks, for
        this rank's query heads (FA3: at most 64); otherwise they go to the project's kernel (GPU) or
        the torch path, as on a backend without sinks."""
        limit = self._hg_sink_heads_max
        return self._hg_native_sinks and (limit is None or self._hg_num_heads <= limit)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        parent = super().build  # type: ignore[misc]  # a mixin: vLLM's builder follows in the MRO
        runtime = current()
        cm = common_attn_metadata
        view = runtime.view_for(cm.num_reqs) if runtime is not None and self._hg_decoder else None
        if view is None:
            return parent(common_prefix_len, cm, fast_build)
        backend = Backend(
            kernel=self._hg_kernel,
            native_sinks=self._hg_sink_lane() and not isinstance(cm.causal, torch.Tensor),
            num_layers=runtime.num_layers,
            num_heads=self._hg_num_heads,
            cpu_native=self._hg_cpu_native and cpu_native.enabled(),  # as the layers read it this step
        )
        verify = os.environ.get(VERIFY_ENV) == "1"
        # A plan builds several metadata per step. ``fast_build`` keeps each self-contained: FlashAttention
        # 3 otherwise copies its ahead-of-time schedule into one persistent buffer (for full CUDA graphs,
        # which mitigated steps do not use), so every earlier build would read the last one's schedule.
        del fast_build
        return build_plan(lambda prefix, common: parent(prefix, common, True), common_prefix_len, cm,
                          view, backend, runtime.stats, verify, self._hg_block_size)  # fmt: skip
