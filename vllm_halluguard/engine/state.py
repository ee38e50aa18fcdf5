"""The plain data a step hands to the methods: a request's state, a mitigated row, the step's rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_halluguard.methods import Config


@dataclass
class RequestState:
    """A mitigated request in a worker: its slot in the persistent tensors, config and method state."""

    req_id: str
    slot: int
    config: Config  # a method's config, or a composition (engine/compose.py gives each member its own)
    prompt_len: int
    #: Method-specific small state that is not worth a persistent tensor (e.g. PruneHal's masks).
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A mitigated row of this step's batch: its index in the batch and its request."""

    index: int
    request: RequestState


@dataclass(frozen=True)
class StepView:
    """The mitigated rows of one engine step (``num_reqs`` rows in the batch in all).

    ``needs_attention``: whether some row needs the plugin in the attention layers this step (decided
    from host data before the CUDA-graph dispatch). A step that needs nothing keeps vLLM's full CUDA
    graphs and its own metadata; its rows still get their per-step planning and model hooks.
    """

    num_reqs: int
    rows: tuple[Row, ...]
    needs_attention: bool = True


_current: Any = None


def current() -> Any:
    """The :class:`~vllm_halluguard.engine.runtime.Runtime` of the model runner in this process."""
    return _current


def set_current(runtime: Any) -> None:
    global _current
    _current = runtime


def worker_log(worker: Any, name: str, clear: bool = False) -> dict[str, dict[str, Any]]:
    """A worker runtime's per-request log ``name`` (e.g. ``prunehal_log``), oldest first; ``clear``
    empties it afterwards. Backs the methods' ``collective_rpc`` trace helpers."""
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is None:
        return {}
    log = runtime.logs.setdefault(name, {})
    out = dict(log)
    if clear:
        log.clear()
    return out


@dataclass
class DeviceRows:
    """Per-row tables of one step on the device, and index tensors of row subsets (no host copy)."""

    last_token: torch.Tensor  # [num_reqs] long
    position: torch.Tensor  # [num_reqs] long: the last token's position (seq_len - 1)
    slot: torch.Tensor  # [num_reqs] long
    prompt_len: torch.Tensor  # [num_reqs] long
    _arange: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0, dtype=torch.long))
    _index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def index(self, rows: list[int]) -> torch.Tensor:
        """A device index tensor of batch ``rows``, made of slices of a device ``arange`` (no host data),
        cached for the step."""
        key = tuple(rows)
        out = self._index.get(key)
        if out is None:
            out = self._index[key] = index_runs(rows, self._arange)
        return out


def index_runs(ids: list[int], arange: torch.Tensor) -> torch.Tensor:
    """The index tensor of ascending ``ids``, made of slices of ``arange`` (on its device): no host data
    is copied to the device."""
    parts, lo = [], 0
    for i in range(1, len(ids) + 1):  # contiguous runs as slices
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            parts.append(arange[ids[lo] : ids[i - 1] + 1])
            lo = i
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def queue_to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """Host buffers that a copy queued behind the stream's work so far fills, and the event after it: on
    CUDA pinned buffers, non-blocking copies and an event (the host reads them once the event has
    completed); elsewhere plain copies and no event. Nothing waits for the stream here."""
    cuda = tensors[0].is_cuda and torch.cuda.is_available()
    hosts = []
    for x in tensors:
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=cuda)
        host.copy_(x, non_blocking=True)
        hosts.append(host)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return hosts, event
