"""Worker-side per-request method state, refreshed once per engine step.

Each request that selects a method gets a stable *slot* when the worker first sees it and keeps it
until it finishes or is preempted (a preempted request is recomputed from scratch, so its state
starts over when it resumes). Method state lives in persistent tensors indexed by slot; every step
the runtime maps the batch rows to slots (:class:`StepView`), and the attention backend reads that
view from its metadata. Plain requests cost nothing: a step without mitigated rows has no view.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_halluguard.engine.requests import MAX_KVSMOOTH_WINDOW, resolve, spec_of
from vllm_halluguard.methods import MethodConfig

logger = logging.getLogger(__name__)


#: Lifecycle counters of :func:`worker_stats` (SCR: edited prefills, images found split across chunks,
#: diagnostic-only steps that stopped after the last diagnostic layer; FarSight-B rows that steps ran
#: through the CPU kernel's native sinks).
STAT_KEYS = (
    "admitted", "released", "preempted", "scr_edits", "scr_split_images", "scr_early_exits",
    "farsight_native_rows",
)  # fmt: skip


@dataclass
class RequestState:
    req_id: str
    slot: int
    config: MethodConfig
    prompt_len: int
    #: Method-specific small state that is not worth a persistent tensor (e.g. cached sink logits).
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A mitigated row of this step's batch: its request and its token span in the flat batch."""

    index: int
    request: RequestState


@dataclass(frozen=True)
class StepView:
    num_reqs: int
    rows: tuple[Row, ...]


class Runtime:
    """Request table and method state of one model runner."""

    def __init__(self, vllm_config: Any) -> None:
        model_config = vllm_config.model_config
        self.hf_config = model_config.hf_config
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        text = self.hf_config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.capacity = vllm_config.scheduler_config.max_num_seqs
        self.requests: dict[str, RequestState] = {}
        self._free = list(range(self.capacity - 1, -1, -1))
        # KVSmooth: one entropy FIFO (ring buffer + push count) per slot and decoder layer.
        self.kvs_queue = torch.zeros(self.capacity, self.num_layers, MAX_KVSMOOTH_WINDOW)
        self.kvs_count = torch.zeros(self.capacity, self.num_layers, dtype=torch.long)
        # PruneHal (engine/prunehal.py): block size for the block view, per-request traces (bounded).
        self.block_size = vllm_config.cache_config.block_size
        self.prunehal_log: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # SCR (engine/scr.py): selections by real request id, diagnostic traces, this step's edits.
        self.model_type = getattr(self.hf_config, "model_type", "")
        self.scr_selections: OrderedDict[str, Any] = OrderedDict()
        self.scr_log: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.scr_plan: tuple[Any, ...] = ()
        self.scr_skip_from: int | None = None
        self.step: StepView | None = None
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    # ----------------------------------------------------------------------------------- lifecycle

    def _admit(self, req_id: str, cached: Any) -> RequestState | None:
        spec = spec_of(getattr(cached.sampling_params, "extra_args", None))
        if spec is None:
            return None
        config = resolve(spec, self.hf_config, self.kv_cache_dtype)  # validated at admission already
        if config is None:
            return None
        if not self._free:
            raise RuntimeError("halluguard: more mitigated requests than max_num_seqs slots")
        slot = self._free.pop()
        self.kvs_queue[slot].zero_()
        self.kvs_count[slot].zero_()
        state = RequestState(req_id, slot, config, len(cached.prompt_token_ids or ()))
        self.requests[req_id] = state
        if config.name == "prunehal":  # image-token positions and keep masks (engine/prunehal.py)
            from vllm_halluguard.engine.prunehal import init_state

            init_state(self, state, cached)
        elif config.name == "scr":  # diagnostic sums, or the selection of the real request
            from vllm_halluguard.engine import scr

            scr.init_state(self, state, cached)
        self.stats["admitted"] += 1
        logger.debug("halluguard: %s -> slot %d (%s)", req_id, slot, config.canonical())
        return state

    def release(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self._free.append(state.slot)
            self.stats["released"] += 1

    def update(self, scheduler_output: Any, input_batch: Any, requests: dict[str, Any]) -> None:
        """Sync with the scheduler's decisions (after the runner updated its batch) and build the view."""
        for req_id in scheduler_output.finished_req_ids:
            self.release(req_id)
            self.scr_selections.pop(req_id, None)  # kept across preemption: recompute reuses it
        for req_id in scheduler_output.preempted_req_ids or ():
            self.stats["preempted"] += req_id in self.requests
            self.release(req_id)
        rows = []
        for index, req_id in enumerate(input_batch.req_ids[: input_batch.num_reqs]):
            state = self.requests.get(req_id)
            if state is None and req_id in requests:
                state = self._admit(req_id, requests[req_id])
            if state is not None:
                rows.append(Row(index, state))
        self.step = StepView(input_batch.num_reqs, tuple(rows)) if rows else None
        self.scr_plan, self.scr_skip_from = (), None
        if any("scr_edit" in row.request.scratch or "scr_diag" in row.request.scratch for row in rows):
            from vllm_halluguard.engine import scr

            scr.plan_step(self, scheduler_output, input_batch, requests)

    def view_for(self, num_reqs: int) -> StepView | None:
        """The current step's view, if the batch being built is that step's batch."""
        step = self.step
        return step if step is not None and step.num_reqs == num_reqs else None


_current: Runtime | None = None


def current() -> Runtime | None:
    """The runtime of the model runner executing in this process (one per worker process)."""
    return _current


def set_current(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def worker_stats(worker: Any) -> dict[str, int]:
    """``LLM.collective_rpc(worker_stats)``: lifecycle counters of a worker's runtime (for tests, ops)."""
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is None:
        return {**dict.fromkeys(STAT_KEYS, 0), "active": 0, "prunehal_reclaimable_blocks": 0}
    # PruneHal: KV blocks of active requests pruned in every layer (could return to the pool).
    log = runtime.prunehal_log
    reclaimable = sum(rec["reclaimable_blocks"] for rid, rec in log.items() if rid in runtime.requests)
    return {**runtime.stats, "active": len(runtime.requests), "prunehal_reclaimable_blocks": reclaimable}


def worker_log(worker: Any, name: str, clear: bool = False) -> dict[str, dict[str, Any]]:
    """A worker runtime's per-request log ``name`` (e.g. ``prunehal_log``), oldest first; ``clear``
    empties it afterwards. Backs the methods' ``collective_rpc`` trace helpers."""
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is None:
        return {}
    log = getattr(runtime, name)
    out = dict(log)
    if clear:
        log.clear()
    return out
