"""A sync sentinel: count the ops that would make the host wait for a CUDA stream, where they run.

On a CPU engine the host and "the device" are one, so nothing here can tell a host tensor from a device
tensor: every op below is counted inside a measured scope, whatever its tensors (conservative; a GPU
would not wait for some of them, e.g. ``.tolist()`` of a tensor that is already on the host):

* ``item`` / ``bool`` / ``int`` / ``float`` / ``__index__`` of a tensor (``aten::_local_scalar_dense``),
  ``tolist``, ``numpy``;
* ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, and
  indexing with a boolean mask (``aten::index`` / ``index_put_`` with a bool index), whose output size
  needs the mask's count on the host;
* moves between devices: ``.cpu()``, ``.cuda()``, ``.to(<device or tensor>)`` (``non_blocking`` is noted);
* tensors made from Python or NumPy data (``torch.tensor``, ``as_tensor``, ``new_tensor``,
  ``from_numpy``: ``aten::lift_fresh``), a host-to-device copy when made for the device.

Scopes: ``layer`` wraps ``engine.execute.run_layer`` (one attention layer call of a mitigated step),
``step`` wraps ``engine.plan.build_plan`` (the step's partition, built once per step by the metadata
builder) and ``read`` wraps ``engine.prunehal.collect`` (the host reading a request's PruneHal decisions
after the forward: ``reads`` counts its calls). In ``read``, reads of the decisions' host buffers (the
:class:`~vllm_halluguard.engine.prunehal.Decision` tensors, which the layer filled with a copy) are not
counted, as on a GPU they are pinned host memory: what is counted there is any read of other tensors,
e.g. the request's device state. Inside them, vLLM's own kernel and metadata builds (the
``native`` and ``build`` callables they are handed) and the project's Triton launch under the interpreter
(``GridExecutor.__call__``, which copies its arguments to NumPy; on a GPU an asynchronous launch) are not
counted: they are the kernels, not the plugin's host code; nor is ``cpu_cache.learn_layout``, CPU_ATTN's
one-time probe of vLLM's page packing (no GPU backend has one), nor the test-only comparison of the
plain rows with a whole-batch pass (``execute._verify_native``, ``HALLUGUARD_VERIFY_NATIVE``). The
wrapper around the launch (``paged_attention_into``'s host-side checks and grid) is counted. In a
step, reads of vLLM's host copies of the metadata (``query_start_loc_cpu``,
``seq_lens_cpu_upper_bound``, ...: the common metadata's ``*_cpu`` fields, where they do not share
storage with a device field) are not counted: they are host tensors on a GPU too.

``with SyncSentinel().engine() as s:`` installs the wrappers while the block runs (an in-process
engine's worker runs in the calling thread); ``s.events`` lists every counted op with its scope and
the first plugin frame that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_T = torch.Tensor
#: Tensor methods that read a device tensor on the host (each waits for the stream).
_READS = {_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__}
_MOVES = {_T.cpu, _T.cuda}
_HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, _T.new_tensor}
_aten = torch.ops.aten
#: aten ops whose output size is data-dependent, or that read a scalar back.
_DATA_DEPENDENT = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.lift_fresh.default: "tensor from Python data",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
}
_INDEX_OPS = {
    _aten.index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
}


#: Per step (the plan, built once per step): the most counted events allowed in any one step, each
#: copy among them non-blocking. Counted conservatively: the step's one host-to-device copy
#: (``plan.Upload``: the request tables, the sink lanes' sinks, the kernel lane's static sinks and masks)
#: and the tensor of request tables it sends (made from Python data, on the host), and the read of
#: ``query_start_loc_cpu`` (a host tensor on a GPU runner; on a CPU runner it may share the device
#: field's storage, and is then counted): on a GPU, one non-blocking copy.
STEP_BOUND = 4


@dataclass(frozen=True)
class Event:
    """One counted op: its scope (``layer`` / ``step`` / ``read``), what it was, where, ``non_blocking``
    and the step it was counted in."""

    scope: str
    kind: str
    where: str
    non_blocking: bool = False
    step: int = 0  # the number of steps begun when it was counted (its step, in the ``step`` scope)


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def host_storages(cm: Any) -> frozenset[int]:
    """The storages of vLLM's host copies in common metadata ``cm`` (fields ``*_cpu``,
    ``*_cpu_upper_bound``), less any it shares with a device field (on a CPU runner they may be one)."""
    host, device = set(), set()
    for f in dataclasses.fields(cm):
        name, x = f.name, getattr(cm, f.name, None)
        if isinstance(x, torch.Tensor) and not name.startswith("_"):
            (host if name.endswith(("_cpu", "_cpu_upper_bound")) else device).add(_storage(x))
    return frozenset(host - device)


class _Local(threading.local):
    def __init__(self) -> None:
        self.host: frozenset[int] = frozenset()  # storages of the step's host metadata (not counted)
        self.scope: str | None = None
        self.paused = 0
        self.quiet = 0  # inside a counted Tensor method: its aten ops are the same sync


def _where() -> str:
    """The innermost frame of the plugin's package (or, failing that, outside torch and this file)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if "vllm_halluguard" in name:
            return f"{name.split('vllm_halluguard', 1)[1].lstrip('/')}:{frame.f_lineno}"
        if fallback is None and "sync_sentinel" not in name and "/torch/" not in name:
            fallback = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def _to_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device (or a tensor, whose device it takes)."""
    if "device" in kwargs or isinstance(kwargs.get("other"), torch.Tensor):
        return True
    return any(
        isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args[1:2]
    )


@dataclass
class SyncSentinel:
    """Counts host syncs per scope (see the module docstring)."""

    events: list[Event] = field(default_factory=list)
    layer_calls: int = 0
    steps: int = 0
    reads: int = 0

    def __post_init__(self) -> None:
        self._local = _Local()
        self._fmode = _FunctionMode(self)
        self._dmode = _DispatchMode(self)

    # ------------------------------------------------------------------ recording

    def _record(self, kind: str, non_blocking: bool = False, tensor: Any = None) -> None:
        local = self._local
        if local.scope is None or local.paused or local.quiet:
            return
        if kind in _HOST_READS and isinstance(tensor, torch.Tensor) and _storage(tensor) in local.host:
            return  # a read of vLLM's host copy of the metadata: no device involved on a GPU
        self.events.append(Event(local.scope, kind, _where(), non_blocking, self.steps))

    def counts(self, scope: str) -> Counter[str]:
        """``where: kind`` -> count of the events of ``scope``."""
        return Counter(f"{e.where} {e.kind}" for e in self.events if e.scope == scope)

    def total(self, scope: str) -> int:
        return sum(1 for e in self.events if e.scope == scope)

    def most_in_one_step(self) -> int:
        """The most events counted in any one step's plan (``step`` scope)."""
        per_step = Counter(e.step for e in self.events if e.scope == "step")
        return max(per_step.values(), default=0)

    def blocking_copies(self, scope: str) -> list[Event]:
        """The moves between devices of ``scope`` that were not made ``non_blocking``."""
        moves = ("cpu", "cuda", "to(device)")
        return [e for e in self.events if e.scope == scope and e.kind in moves and not e.non_blocking]

    def reset(self) -> None:
        self.events.clear()
        self.layer_calls = self.steps = self.reads = 0

    # --------------------------------------------------------------------- scopes

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Count the ops of this block as ``name`` (scopes do not nest: the outer one wins)."""
        local = self._local
        if local.scope is not None:
            yield
            return
        local.scope = name
        try:
            with self._fmode, self._dmode:
                yield
        finally:
            local.scope = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing in this block (a kernel: vLLM's, or the interpreted Triton launch)."""
        self._local.paused += 1
        try:
            if self._local.scope is None:
                yield
            else:
                with _disable_current_modes(), torch._C.DisableTorchFunction():
                    yield
        finally:
            self._local.paused -= 1

    def _unpaused(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.paused():
                return fn(*args, **kwargs)

        return call

    @contextlib.contextmanager
    def engine(self) -> Iterator[SyncSentinel]:
        """Wrap the plugin's layer call and step plan, and pause inside kernels, while the block runs."""
        from triton.runtime import interpreter

        from vllm_halluguard.engine import cpu_cache, execute, plan, prunehal

        run_layer, build_plan, launch = execute.run_layer, plan.build_plan, interpreter.GridExecutor.__call__
        learn, collect, verify = cpu_cache.learn_layout, prunehal.collect, execute._verify_native

        def layer(impl: Any, native: Any, *args: Any, **kwargs: Any) -> Any:
            self.layer_calls += 1
            with self.scope("layer"):
                return run_layer(impl, self._unpaused(native), *args, **kwargs)

        def step(build: Any, prefix: int, cm: Any, *args: Any, **kwargs: Any) -> Any:
            self.steps += 1
            self._local.host = host_storages(cm)
            try:
                with self.scope("step"):
                    return build_plan(self._unpaused(build), prefix, cm, *args, **kwargs)
            finally:
                self._local.host = frozenset()

        def read(runtime: Any, st: Any, wait: bool) -> Any:
            self.reads += 1
            buffers = [t for d in st.pending for t in (d.fired, d.keep)]
            self._local.host = frozenset(_storage(t) for t in buffers)
            try:
                with self.scope("read"):
                    return collect(runtime, st, wait)
            finally:
                self._local.host = frozenset()

        def grid(executor: Any, *args: Any, **kwargs: Any) -> Any:
            with self.paused():
                return launch(executor, *args, **kwargs)

        execute.run_layer, plan.build_plan = layer, step  # type: ignore[assignment]
        interpreter.GridExecutor.__call__ = grid  # type: ignore[method-assign]
        cpu_cache.learn_layout = self._unpaused(learn)  # type: ignore[assignment]
        prunehal.collect = read  # type: ignore[assignment]
        execute._verify_native = self._unpaused(verify)  # type: ignore[assignment]
        try:
            yield self
        finally:
            execute.run_layer, plan.build_plan = run_layer, build_plan
            interpreter.GridExecutor.__call__ = launch  # type: ignore[method-assign]
            cpu_cache.learn_layout = learn  # type: ignore[assignment]
            prunehal.collect = collect  # type: ignore[assignment]
            execute._verify_native = verify  # type: ignore[assignment]


class _FunctionMode(TorchFunctionMode):
    def __init__(self, sentinel: SyncSentinel) -> None:
        super().__init__()
        self.sentinel = sentinel

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = None
        if func in _READS or func in _MOVES or func in _FACTORIES:
            kind = getattr(func, "__name__", str(func))
        elif func is _T.to and _to_device(args, kwargs):
            kind = "to(device)"
        if kind is None:
            return func(*args, **kwargs)
        self.sentinel._record(kind, bool(kwargs.get("non_blocking", False)), args[0] if args else None)
        local = self.sentinel._local
        local.quiet += 1
        try:
            return func(*args, **kwargs)
        finally:
            local.quiet -= 1


class _DispatchMode(TorchDispatchMode):
    def __init__(self, sentinel: SyncSentinel) -> None:
        super().__init__()
        self.sentinel = sentinel

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _DATA_DEPENDENT.get(func)
        if kind is None and func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                kind = "boolean-mask index"
        elif kind is None and func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kind = "repeat_interleave"
        if kind is not None:
            self.sentinel._record(kind)
        return func(*args, **kwargs)


def sync_counts(s: SyncSentinel) -> dict[str, Any]:
    """A JSON-able summary of ``s``: calls, totals per scope, the most in one step, the blocking copies
    of the steps and every counted event by scope, place and kind."""
    return {
        "layer_calls": s.layer_calls,
        "steps": s.steps,
        "reads": s.reads,
        **{scope: s.total(scope) for scope in ("layer", "step", "read")},
        "most_in_one_step": s.most_in_one_step(),
        "blocking": [f"{e.where} {e.kind}" for e in s.blocking_copies("step")],
        "events": {scope: dict(s.counts(scope)) for scope in ("layer", "step", "read")},
    }
