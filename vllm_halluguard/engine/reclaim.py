"""Fully pruned prompt KV blocks go back to vLLM's block pool (PruneHal's reclaiming variant).

The prune is decided in the worker, the blocks belong to the scheduler's ``KVCacheManager``. Per step:

1. **Worker, at the decision** (:func:`queue`): the request's newly fully pruned logical blocks go to
   the *outbox* (for the scheduler) and to *pending* (for the worker's own block table).
2. **Worker, end of the step** (``GPUModelRunner.sample_tokens``, wrapped): the host reads the step's
   decisions (PruneHal decides on the device; :data:`READ_DECISIONS`), and the outbox rides on that
   step's ``ModelRunnerOutput`` as the attribute :data:`FIELD` ``{req_id: (admission, [blocks])}``.
   With one worker (how PruneHal is served) the worker runs in the engine-core process and the output
   is the same object; multi-process executors pickle it, and the attribute travels in its ``__dict__``.
3. **Worker, next step** (:func:`apply_pending`, from ``PruneHalEngine.plan_step`` after vLLM updated
   its batch): the blocks' entries in the worker's block table and in the request's ``block_ids`` become
   the null block (id 0, zero-filled, never written), before the step's metadata is built. From then on
   no kernel path (native, Triton, torch gathers) reads the old physical blocks; the positions are
   masked anyway, and zeros keep the masked logits and values finite.
4. **Scheduler** (``Scheduler.update_from_output``, wrapped: :func:`free_reported`): each contiguous
   run is released with ``SingleTypeKVCacheManager._remove_blocks_in_range`` (vLLM's own mid-request
   free, used for R-SWA): the request's list keeps its length with the null block in place, and
   ``BlockPool.free_blocks`` drops this request's reference. A block shared through the prefix cache
   stays with its other holders; a cached block stays cached until it is evicted (its K/V are the
   prompt's, unchanged by the prune, so the hash stays valid).

The free happens after the step whose decision produced it, and the blocks can be reused from the
next scheduled step, while the worker stopped reading them at that step's start. A report is applied
only if the request still runs the same admission (``admission == num_preemptions + 1``): a report that
a preemption overtook (async scheduling) is dropped; after a recompute the worker starts over with a
fresh state. Not freed: with several KV-cache groups, or when vLLM defers frees (KV-consumer connectors
with overlapping batches).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: The attribute of ``ModelRunnerOutput`` that carries ``{req_id: (admission, [logical blocks])}``.
FIELD = "halluguard_freed_blocks"
#: ``Runtime.ext`` key of the worker-side reclaim state.
EXT = "prunehal_reclaim"
#: Scheduler-side counters (``scheduler._halluguard_stats``).
STAT_FREED = "prunehal_freed_blocks"
STAT_REQUESTS = "prunehal_reclaiming_requests"
#: Blocks freed so far, per engine-core request (``request.__dict__``).
REQUEST_FREED = "_halluguard_freed_blocks"
#: ``Runtime.ext`` key of a callable ``(runtime) -> None`` that reads the step's prune decisions on the
#: host (PruneHal decides on the device); called at the end of the step, before the outbox is taken.
READ_DECISIONS = "prunehal_read_decisions"


def _ext(runtime: Any) -> dict[str, dict[str, Any]]:
    return runtime.ext.setdefault(EXT, {"outbox": {}, "pending": {}})


def queue(runtime: Any, req_id: str, admission: int, blocks: list[int]) -> None:
    """After a prune (worker): free ``blocks`` (logical indices) of the request's current admission."""
    if not blocks:
        return
    ext = _ext(runtime)
    ext["outbox"].setdefault(req_id, (admission, []))[1].extend(blocks)
    ext["pending"].setdefault(req_id, []).extend(blocks)


def forget(runtime: Any, req_id: str) -> None:
    """The request left the worker (finished or preempted): nothing of it is pending any more."""
    ext = runtime.ext.get(EXT)
    if ext is not None:
        ext["pending"].pop(req_id, None)


def apply_pending(runtime: Any, input_batch: Any, requests: dict[str, Any]) -> int:
    """Point the pending blocks of the worker's block table (and of ``block_ids``) at the null block.

    Runs after vLLM's ``_update_states`` and before the step's metadata: returns the entries rewritten.
    """
    ext = runtime.ext.get(EXT)
    if not ext or not ext["pending"]:
        return 0
    tables = input_batch.block_table.block_tables
    if len(tables) != 1:
        ext["pending"].clear()
        return 0
    table, done = tables[0], 0
    for req_id, blocks in ext["pending"].items():
        cached = requests.get(req_id)
        if cached is not None:
            ids = cached.block_ids[0]
            for b in blocks:
                if b < len(ids):
                    ids[b] = 0
        row = input_batch.req_id_to_index.get(req_id)
        if row is not None:
            n = int(table.num_blocks_per_row[row])
            for b in blocks:
                if b < n:
                    table.block_table.np[row, b] = 0
                    done += 1
    ext["pending"].clear()
    return done


def take_outbox(runtime: Any) -> dict[str, tuple[int, list[int]]]:
    ext = runtime.ext.get(EXT)
    if not ext or not ext["outbox"]:
        return {}
    out = dict(ext["outbox"])
    ext["outbox"].clear()
    return out


def runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Contiguous ``[first, last)`` runs of sorted distinct block indices."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def free_reported(scheduler: Any, reports: dict[str, tuple[int, list[int]]]) -> int:
    """Free the reported blocks in the scheduler's KV cache manager; returns the blocks freed."""
    from vllm.v1.request import RequestStatus

    if getattr(scheduler, "defer_block_free", False):
        return 0
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        return 0
    manager = managers[0]
    stats = scheduler.__dict__.setdefault("_halluguard_stats", {})
    total = 0
    for req_id, (admission, blocks) in reports.items():
        request = scheduler.requests.get(req_id)
        if request is None or request.status != RequestStatus.RUNNING:
            continue
        if request.num_preemptions + 1 != admission:
            continue  # overtaken by a preemption: the blocks are another allocation's
        held = manager.req_to_blocks.get(req_id, [])
        before = sum(not b.is_null for b in held)
        for first, last in runs(blocks):
            manager._remove_blocks_in_range(req_id, first, last)
        freed = before - sum(not b.is_null for b in manager.req_to_blocks.get(req_id, []))
        if freed:
            previous = request.__dict__.get(REQUEST_FREED, 0)
            request.__dict__[REQUEST_FREED] = previous + freed
            stats[STAT_REQUESTS] = stats.get(STAT_REQUESTS, 0) + (previous == 0)
            total += freed
    stats[STAT_FREED] = stats.get(STAT_FREED, 0) + total
    return total


def scheduler_stats(engine_core: Any) -> dict[str, int]:
    """Reclaim counters of an engine core's scheduler (in-process engines; tests and ops)."""
    stats = engine_core.scheduler.__dict__.get("_halluguard_stats", {})
    return {key: int(stats.get(key, 0)) for key in (STAT_FREED, STAT_REQUESTS)}


@functools.cache
def install_scheduler() -> None:
    """Wrap ``Scheduler.update_from_output`` (engine core): free the blocks a step's output reports."""
    from vllm.v1.core.sched.scheduler import Scheduler

    update_from_output = Scheduler.update_from_output

    @functools.wraps(update_from_output)
    def _update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = update_from_output(self, scheduler_output, model_runner_output)
        reports = getattr(model_runner_output, FIELD, None)
        if reports:
            free_reported(self, reports)
        return outputs

    Scheduler.update_from_output = _update_from_output


@functools.cache
def install_worker() -> None:
    """Wrap ``GPUModelRunner.sample_tokens`` (worker; installed with the runner hook): the outbox
    rides on the step's ``ModelRunnerOutput``."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample_tokens = GPUModelRunner.sample_tokens

    @functools.wraps(sample_tokens)
    def _sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = sample_tokens(self, *args, **kwargs)
        runtime = self.__dict__.get("_halluguard_runtime")
        read = None if runtime is None else runtime.ext.get(READ_DECISIONS)
        if read is not None:  # vLLM has read this step's sampled tokens back: its forward is done
            read(runtime)
        if runtime is None or not runtime.ext.get(EXT, {}).get("outbox"):
            return out
        target = out if isinstance(out, ModelRunnerOutput) else getattr(out, "_model_runner_output", None)
        if isinstance(target, ModelRunnerOutput) and target is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(target, FIELD, take_outbox(runtime))
        return out

    GPUModelRunner.sample_tokens = _sample_tokens
