"""The contract every engine method fulfils: :class:`EngineMethod`, and the :class:`Route` of a row.

An engine method is one small class per method (``engine/kvsmooth.py``, ``farsight.py``,
``prunehal.py``, ``scr.py``), registered in :mod:`vllm_halluguard.engine.registry`. It owns:

* **admission** (front-end process): :meth:`EngineMethod.check_inputs` refuses prompts or engine
  settings it cannot serve (``ValueError``);
* **request state** (worker): :meth:`~EngineMethod.setup` (per-runner buffers), :meth:`~EngineMethod.
  init_state` and :meth:`~EngineMethod.release` (per request), :meth:`~EngineMethod.plan_step`
  (optional per-step planning, e.g. SCR's edits);
* **where its rows' attention is computed** (:meth:`~EngineMethod.route`, once per step): natively
  (the default), natively with per-head sink logits as a sub-batch, or reworked in some layers by the
  method's own attention (torch on CPU) or by the project's Triton kernel (sinks, key mask, row
  statistics in one launch: :meth:`~EngineMethod.kernel_args`, :meth:`~EngineMethod.after_kernel`);
* **its work in a layer call** (:meth:`~EngineMethod.run`): compute the reworked rows' outputs and
  observe the others (statistics, cache edits), batched over its rows.

Runtime, builders and backends call these hooks and know no method by name.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_halluguard.engine.state import RequestState, Row

if TYPE_CHECKING:
    from vllm_halluguard.engine.layer import LayerCall
    from vllm_halluguard.methods import MethodConfig


@dataclass(frozen=True)
class Route:
    """Where one mitigated row's attention is computed in one step.

    ``rework``: decoder layers in which the method's own attention computes the row (the native
    kernel skips it there). ``sinks``: per-head sink logits ``[Hq]`` under which the native kernel
    computes the row, as a sub-batch shared by the rows with the same ``sink_key``, in
    ``sink_layers`` (``None``: every layer; elsewhere the sub-batch runs without sinks).
    """

    rework: frozenset[int] = frozenset()
    sinks: torch.Tensor | None = None
    sink_key: Hashable | None = None
    sink_layers: frozenset[int] | None = None


NATIVE = Route()


@dataclass(frozen=True)
class RowSpan:
    """A row's tokens in the flat batch: ``start:end``, its sequence length after this step."""

    start: int
    end: int
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def first_position(self) -> int:
        return self.seq_len - self.num_tokens


@dataclass(frozen=True)
class Backend:
    """What the attention backend can do for a method's rows (decides the routes).

    ``kernel``: mitigated rows are reworked by the project's Triton kernel (GPU, or its interpreter
    in tests); otherwise by the methods' torch path (CPU). ``native_sinks``: the native kernel takes
    per-head sink logits (a FarSight mode-B sub-batch runs natively). ``cpu_native``: the torch path's
    layers are served by the native CPU kernels (:mod:`~vllm_halluguard.kernels.cpu_native`: a CPU cache
    in the model's dtype, one tensor-parallel rank, the kernels built), which take a composition's
    members' terms (:class:`KeptKeys`, :class:`RowSinks`).
    """

    kernel: bool
    native_sinks: bool
    num_layers: int
    num_heads: int
    cpu_native: bool = False


#: ``RequestState.scratch`` keys through which a composition (engine/compose.py) hands one member's terms
#: to another on the native CPU path, set for the step by its ``route``: a :class:`KeptKeys` (read by a
#: member that measures attention, KVSmooth) and a :class:`RowSinks` (taken by a member that computes the
#: row's output, PruneHal).
KEPT_KEYS = "compose_kept_keys"
ROW_SINKS = "compose_row_sinks"


@dataclass(frozen=True)
class KeptKeys:
    """A member's key mask of a row as of the step's start: the keys at ``positions [N]`` (host, int64)
    are kept where ``keep[index[layer]]`` (``[L, N]`` bool) is True, in the layers of ``index``. With
    ``row``, ``keep`` is the ``[B, L, N]`` masks of a batched decision and the row's are ``keep[row]``
    (rows that decided together share it: a reader takes theirs in one op)."""

    positions: torch.Tensor
    keep: torch.Tensor
    index: dict[int, int]
    row: int | None = None


@dataclass(frozen=True)
class RowSinks:
    """A member's per-head sink logits ``sinks [Hq]`` (fp32) of a row, in ``layers`` (``None``: every one)."""

    sinks: torch.Tensor
    layers: frozenset[int] | None


class EngineMethod:
    """Base class: every hook has a no-op default; a method overrides what it needs."""

    name: ClassVar[str]
    #: The method acts on image tokens: a request without an image is refused at admission.
    needs_image: ClassVar[bool] = False
    #: The method rewrites generated tokens' cached K/V: their blocks must not serve other requests'
    #: prompts from the prefix cache (the reference computes those tokens' K/V raw).
    edits_generated_kv: ClassVar[bool] = False
    #: The method's decode steps carry state a chunked recompute cannot reproduce (KVSmooth's smoothed
    #: K/V and entropy FIFOs, PruneHal's prune history): after a preemption the request replays its
    #: generated tokens one per step (:mod:`vllm_halluguard.engine.replay`).
    replays_decode: ClassVar[bool] = False
    #: The method is correct with tensor parallelism (its decisions see every head, reduced across the
    #: ranks by :mod:`vllm_halluguard.engine.tp`); others are refused when ``tensor_parallel_size > 1``.
    tensor_parallel: ClassVar[bool] = False
    #: The method is correct with pipeline parallelism (no decision reads layers of another stage);
    #: others are refused at admission when ``pipeline_parallel_size > 1``.
    pipeline_parallel: ClassVar[bool] = False
    #: Why :attr:`pipeline_parallel` is off (the admission error).
    pipeline_reason: ClassVar[str] = "it has not been run across pipeline stages"
    #: Worker counters this method adds to ``worker_stats`` (start at 0), and its gauges
    #: (:meth:`worker_stats`).
    counters: ClassVar[tuple[str, ...]] = ()
    gauges: ClassVar[tuple[str, ...]] = ()

    # --------------------------------------------------------------------- admission (front end)

    def check_settings(self, cfg: MethodConfig, vllm_config: Any) -> None:
        """Raise ``ValueError`` if the engine's settings alone rule ``cfg`` out, whatever the request
        (admission refuses it; ``GET /v1/mitigations`` reports it as not served, with the message)."""

    def check_inputs(
        self, cfg: MethodConfig, images: Sequence[Any], prompt_len: int, vllm_config: Any
    ) -> None:
        """Raise ``ValueError`` if this request cannot be served (``images``: its image features)."""

    # --------------------------------------------------------------------------- worker: state

    def setup(self, runtime: Any) -> None:
        """Create this method's per-runner state (``runtime.ext[self.name]``), once."""

    def init_state(self, runtime: Any, state: RequestState, cached: Any) -> None:
        """A request enters the worker (``cached``: vLLM's ``CachedRequestState``)."""

    def release(self, runtime: Any, state: RequestState) -> None:
        """A request leaves the worker (finished, aborted or preempted)."""

    def finished(self, runtime: Any, req_id: str) -> None:
        """Any request (of this method or not) finished for good (not preempted)."""

    def plan_step(
        self, runtime: Any, rows: list[Row], scheduler_output: Any, input_batch: Any, requests: Any
    ) -> None:
        """Per-step planning after the batch is known (host side, once per step)."""

    def install_model_hooks(self, runtime: Any, model: torch.nn.Module, attention_layers: Any) -> bool:
        """Install model-level hooks this step needs (once per runner); return whether it installed."""
        return False

    def worker_stats(self, runtime: Any) -> dict[str, int]:
        """The values of :attr:`gauges` for ``worker_stats``."""
        return {}

    # ---------------------------------------------------------------------- worker: attention

    def route(self, row: Row, span: RowSpan, backend: Backend) -> Route:
        """Where the row's attention is computed this step (default: the native kernel everywhere)."""
        return NATIVE

    def kept_keys(self, row: Row) -> KeptKeys | None:
        """The key mask this method applies to ``row`` in this step (its torch route reworks those layers),
        for a composition's other members; ``None``: none."""
        return None

    def sink_layers(self, row: Row, span: RowSpan) -> frozenset[int]:
        """The layers in which this method's torch path computes ``row``'s output and can take a
        composition's :class:`RowSinks` (native CPU path); empty: it takes none."""
        return frozenset()

    def needs_attention(self, row: Row, span: RowSpan) -> bool:
        """Whether the row may need the plugin in attention this step, on any backend: ``False`` only
        where :meth:`route` is native and :meth:`observes` is false whatever the backend. Asked before
        the CUDA-graph dispatch, from host data: ``span.start`` is 0 (the flat offsets are not known
        yet); ``span.num_tokens`` and ``span.seq_len`` are the step's. A step none of whose rows needs
        attention keeps vLLM's full CUDA graphs and metadata (default: needed)."""
        return True

    def observes(self, row: Row, span: RowSpan, backend: Backend) -> bool:
        """Whether :meth:`run` has work for this row this step beyond computing its reworked layers
        (statistics, cache edits). A step none of whose rows is reworked, in a sink lane or observed
        runs entirely on vLLM's metadata (default: observed)."""
        return True

    def observed_layers(self, rows: list[Row]) -> frozenset[int] | None:
        """The decoder layers where :meth:`run` has work for ``rows`` (the step's rows it reworks on the
        torch path or observes), or ``None`` for every layer (the default). A layer no method's rows
        need, and where no row is reworked, runs the native kernel alone, without a layer call."""
        return None

    def run(self, call: LayerCall, rows: list[Row]) -> None:
        """One layer call: compute the rows this layer reworks, observe the others (torch path).

        Passed: the rows reworked in this step (torch path) and the rows :meth:`observes`; rows the
        kernel lane computed in this layer (:meth:`after_kernel`) and rows of a sink lane are not.

        The default sends single-token rows to :meth:`apply_batch` together (when the backend can gather
        several rows at once) and every other row to :meth:`apply`.
        """
        single = []
        for row in rows:
            if call.gather_batch is not None and call.is_single(row) and self.batched:
                single.append(row)
            else:
                self.apply(call, row)
        if single:
            self.apply_batch(call, single)

    #: Whether :meth:`apply_batch` exists for single-token rows.
    batched: ClassVar[bool] = False

    def apply(self, call: LayerCall, row: Row) -> None:
        """One row of :meth:`run`."""

    def apply_batch(self, call: LayerCall, rows: list[Row]) -> None:
        """Single-token rows of :meth:`run`, together."""
        for row in rows:
            self.apply(call, row)

    def kernel_args(self, call: LayerCall, row: Row) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Kernel lane: the row's sink logits ``[n, Hq]`` and key mask ``[seq_len]`` (``None``: none)."""
        return None, None

    def kernel_args_static(self, row: Row) -> bool:
        """Whether :meth:`kernel_args` depends only on the row, its span and the layer index (not on
        state the step's earlier layers change): the builder then computes it for every layer once per
        step, on the host, and copies it to the device with the step's plan (no copy in a layer call).
        The default (no kernel arguments) is."""
        return type(self).kernel_args is EngineMethod.kernel_args

    def kernel_sinks(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        """The sinks of :meth:`kernel_args` alone."""
        return self.kernel_args(call, row)[0]

    def kernel_mask(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        """The key mask of :meth:`kernel_args` alone."""
        return self.kernel_args(call, row)[1]

    def kernel_sinks_static(self, row: Row) -> bool:
        """Whether :meth:`kernel_sinks` is static (as :meth:`kernel_args_static`) even where the mask is not:
        the builder then makes the lane's sinks once per step, and a layer call only the masks."""
        return self.kernel_args_static(row)

    def lane_mask(
        self, call: LayerCall, lp: Any, rows: list[Row], mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Write the key masks of ``rows`` (this method's rows of the kernel lane of layer plan ``lp``, a
        :class:`~vllm_halluguard.engine.plan.LayerPlan`) into the lane's ``mask [len(lp.rework),
        lp.width]`` (made all True where the first row needs one, on that row's device) and return it.
        Default: each row's :meth:`kernel_mask`."""
        at = {r.index: j for j, r in enumerate(lp.rework)}
        for row in rows:
            row_mask = self.kernel_mask(call, row)
            if row_mask is None:
                continue
            if mask is None:
                mask = torch.ones(len(lp.rework), lp.width, dtype=torch.bool, device=row_mask.device)
            mask[at[row.index], : row_mask.shape[0]] = row_mask
        return mask

    def prepare_step(self, plan: Any, rows: list[Row], kernel: bool) -> None:
        """Once per step, in the metadata builder: tables for the rows that every layer call of the step
        will hand :meth:`run` (``kernel=False``) or :meth:`after_kernel` (``kernel=True``), kept in
        ``plan.prepared`` (:class:`~vllm_halluguard.engine.plan.StepPlan`), so that a layer call does no
        per-row work. Default: none."""

    def after_kernel(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        """Kernel lane: the rows' outputs are in ``call.output``; ``lse, entropy [T, Hq]`` per token."""
