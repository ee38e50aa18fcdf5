"""Worker-side per-request method state, refreshed once per engine step.

Each request that selects a method gets a stable *slot* when the worker first sees it and keeps it
until it finishes or is preempted. A preempted request is admitted again when vLLM recomputes it, with
a fresh state: methods whose generated tokens compute the same in a prefill chunk (FarSight, SCR, whose
selection is kept until the request finishes) are recomputed as vLLM schedules them; a request with a
method whose decode steps carry state (KVSmooth, PruneHal, alone or composed) replays its generated
tokens one per step (:mod:`~vllm_halluguard.engine.replay`), which rebuilds the state and the cache
exactly as the unpreempted run left them. Method state lives in persistent tensors indexed by slot, created by
each engine method (:meth:`~vllm_halluguard.engine.base.EngineMethod.setup`); every step the runtime
maps the mitigated requests to their batch rows (:class:`StepView`), and the attention backend reads
that view. Plain requests cost no per-row work: a request is looked at once, when it arrives, and a
step without mitigated rows has no view.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from typing import Any

from vllm_halluguard.engine import registry
from vllm_halluguard.engine.base import RowSpan
from vllm_halluguard.engine.guards import VERIFY_ENV
from vllm_halluguard.engine.keys import config_of
from vllm_halluguard.engine.registry import all_methods
from vllm_halluguard.engine.state import RequestState, Row, StepView, current, set_current

logger = logging.getLogger(__name__)

__all__ = ["RequestState", "Row", "Runtime", "StepView", "current", "sync_step", "worker_stats"]

#: Lifecycle counters of :func:`worker_stats`; each engine method adds its own (``counters``).
#: ``kernel_rows``: row-layers the Triton kernel computed; ``native_checked`` / ``native_mismatch``:
#: native row-layers compared with a whole-batch native pass (``HALLUGUARD_VERIFY_NATIVE=1``);
#: ``compose_member_routes``: composed rows whose members kept their own routes on the native CPU path,
#: summed over steps (engine/compose.py).
STAT_KEYS = (
    "admitted", "released", "preempted", "kernel_rows", "native_checked", "native_mismatch",
    "compose_member_routes",
)  # fmt: skip
#: Largest |difference| of a mismatching native row (``HALLUGUARD_VERIFY_NATIVE=1``).


class Runtime:
    """Request table and method state of one model runner."""

    def __init__(self, vllm_config: Any) -> None:
        model_config = vllm_config.model_config
        self.hf_config = model_config.hf_config
        self.model_type = getattr(self.hf_config, "model_type", "")
        text = self.hf_config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.capacity = vllm_config.scheduler_config.max_num_seqs
        self.block_size = vllm_config.cache_config.block_size
        self.requests: dict[str, RequestState] = {}
        self._free = list(range(self.capacity - 1, -1, -1))
        self.step: StepView | None = None
        self.stats: dict[str, float] = {**dict.fromkeys(STAT_KEYS, 0), "native_max_diff": 0.0}
        #: Per-method runner state (``ext[name]``) and bounded per-request logs (``logs[name]``).
        self.ext: dict[str, Any] = {}
        self.logs: dict[str, OrderedDict[str, dict[str, Any]]] = {}
        for method in registry.all_methods():
            self.stats.update(dict.fromkeys(method.counters, 0))
            method.setup(self)

    # ----------------------------------------------------------------------------------- lifecycle

    def _admit(self, req_id: str, cached: Any) -> RequestState | None:
        config = config_of(cached)  # resolved at admission; parsed once per process
        if config is None:
            return None
        if not self._free:
            raise RuntimeError("halluguard: more mitigated requests than max_num_seqs slots")
        state = RequestState(req_id, self._free.pop(), config, len(cached.prompt_token_ids or ()))
        self.requests[req_id] = state
        registry.method_of(config).init_state(self, state, cached)
        self.stats["admitted"] += 1
        logger.debug("halluguard: %s -> slot %d (%s)", req_id, state.slot, config.canonical())
        return state

    def release(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            registry.method_of(state.config).release(self, state)
            self._free.append(state.slot)
            self.stats["released"] += 1

    def retire(self, scheduler_output: Any) -> None:
        """Release the step's finished and preempted requests (idempotent: a runner may call it before
        :meth:`update` for a step that computes nothing)."""
        for req_id in scheduler_output.finished_req_ids:
            self.release(req_id)
            for method in registry.all_methods():
                method.finished(self, req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.stats["preempted"] += req_id in self.requests
            self.release(req_id)

    def update(self, scheduler_output: Any, input_batch: Any, requests: dict[str, Any]) -> None:
        """Sync with the scheduler's decisions (after the runner updated its batch) and build the view.

        No work per plain row: requests are admitted when they arrive (new, or resumed after a
        preemption: the only steps where a request enters the batch), and the view is built from the
        mitigated requests' batch indices (``input_batch.req_id_to_index``)."""
        self.retire(scheduler_output)
        for req_id in arrivals(scheduler_output):
            if req_id not in self.requests and req_id in requests:
                self._admit(req_id, requests[req_id])
        rows: list[Row] = []
        if self.requests:
            index_of = input_batch.req_id_to_index.get
            for state in self.requests.values():
                index = index_of(state.req_id)
                if index is not None and index < input_batch.num_reqs:
                    rows.append(Row(index, state))
            rows.sort(key=lambda row: row.index)
        self.step = (
            StepView(
                input_batch.num_reqs, tuple(rows), self._needs_attention(rows, scheduler_output, requests)
            )
            if rows
            else None
        )
        by_method: dict[str, list[Row]] = {}
        for row in rows:  # a composed row is planned by each of its members
            for method, member_row in registry.member_rows(row):
                by_method.setdefault(method.name, []).append(member_row)
        for method in registry.all_methods():
            method.plan_step(self, by_method.get(method.name, []), scheduler_output, input_batch, requests)

    @staticmethod
    def _needs_attention(rows: list[Row], scheduler_output: Any, requests: dict[str, Any]) -> bool:
        """Whether some row needs the plugin in attention this step (:meth:`EngineMethod.needs_attention`
        of each member, on the step's token count and the request's computed tokens); always in the
        native-check mode (``HALLUGUARD_VERIFY_NATIVE=1``), which compares every mitigated step."""
        if os.environ.get(VERIFY_ENV) == "1":
            return True
        scheduled = scheduler_output.num_scheduled_tokens
        for row in rows:
            req_id = row.request.req_id
            n = scheduled[req_id]
            span = RowSpan(0, n, requests[req_id].num_computed_tokens + n)
            if any(method.needs_attention(member, span) for method, member in registry.member_rows(row)):
                return True
        return False

    def view_for(self, num_reqs: int) -> StepView | None:
        """The current step's view, if the batch being built is that step's batch and some row needs the
        plugin in attention (else the builder returns vLLM's own metadata, which a full graph replays)."""
        step = self.step
        if step is None or not step.needs_attention or step.num_reqs != num_reqs:
            return None
        return step

    def remember(self, log: str, req_id: str, record: dict[str, Any], limit: int) -> None:
        """Keep ``record`` under ``req_id`` in the bounded log ``log`` (oldest dropped first)."""
        table = self.logs.setdefault(log, OrderedDict())
        table[req_id] = record
        while len(table) > limit:
            table.popitem(last=False)


def arrivals(scheduler_output: Any) -> list[str]:
    """Ids of the requests that enter the runner's batch in this step: new ones (V2 sends a resumed
    request as new) and, on V1, those resumed after a preemption."""
    ids = [data.req_id for data in scheduler_output.scheduled_new_reqs]
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed:
        ids.extend(resumed)
    return ids


def worker_stats(worker: Any) -> dict[str, float]:
    """``LLM.collective_rpc(worker_stats)``: lifecycle counters of a worker's runtime (for tests, ops)."""
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is None:  # no mitigated request yet: every counter and gauge at zero
        stats: dict[str, float] = {**dict.fromkeys(STAT_KEYS, 0), "native_max_diff": 0.0}
        for method in registry.all_methods():
            stats.update(dict.fromkeys((*method.counters, *method.gauges), 0))
        return {**stats, "active": 0}
    extra: dict[str, int] = {}
    for method in registry.all_methods():
        extra.update(method.worker_stats(runtime))
    return {**runtime.stats, "active": len(runtime.requests), **extra}


#: The name under which :func:`worker_stats` is a worker method, so that a front end reaches it with
#: ``collective_rpc(RPC_NAME)`` (a string: no function pickling across processes).
RPC_NAME = "halluguard_worker_stats"


@functools.cache
def install_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, RPC_NAME, worker_stats)


def sync_step(runner: Any, scheduler_output: Any, batch: Any, requests: dict[str, Any]) -> None:
    """Sync ``runner``'s :class:`Runtime` with one step whose rows are ``batch.req_ids[:batch.num_reqs]``
    (``requests``: the runner's request records by id) and install the model hooks the step needs.
    Both runners call it once per step, before the step's CUDA-graph dispatch and metadata builds."""
    runtime = runner.__dict__.get("_halluguard_runtime")
    if runtime is None:
        runtime = runner._halluguard_runtime = Runtime(runner.vllm_config)
        logger.info("halluguard: following %s.%s", type(runner).__module__, type(runner).__qualname__)
    set_current(runtime)
    runtime.update(scheduler_output, batch, requests)
    if runtime.step is not None:
        forward_context = runner.vllm_config.compilation_config.static_forward_context
        for method in all_methods():
            method.install_model_hooks(runtime, runner.get_model(), forward_context)
