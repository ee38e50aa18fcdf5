"""vLLM's V2 model runner (``vllm/v1/worker/gpu/``, the GPU default in vLLM 0.32): the same runtime.

V1 keeps a persistent batch and a request table (``CachedRequestState``) that the runtime reads after
``_update_states``. V2 orders each step's rows anew (``gather_batch_req_state``: vLLM's
``sort_batch_req_ids``) and keeps request state in tensors, without ``extra_args``. Hooks on the V2
``GPUModelRunner`` (the CPU build's V2 ``CPUModelRunner`` subclasses it):

* ``add_requests``: each new mitigated request's data (``NewRequestData``: sampling params with
  ``extra_args``, prompt, multimodal features) is kept as a :class:`V2Request`, which the methods read
  with the names of V1's ``CachedRequestState``; plain requests are not kept. V2 re-sends a resumed
  request as new, so preemption starts over.
* ``finish_requests``: finished and preempted requests are forgotten.
* ``gather_batch_req_state``: once vLLM has ordered the step's rows, the runtime syncs with them
  (:func:`~vllm_halluguard.engine.runtime.sync_step`): before the CUDA-graph dispatch and before the
  metadata builders run, as after V1's ``_update_states``. A dummy run (profiling, capture, DP
  padding) has no mitigated rows.
* ``CudaGraphManager.dispatch``: a step whose mitigated rows need the plugin in attention never
  replays a FULL graph (:func:`install_cudagraph_guard`; V1's guard is in :mod:`.hooks`); the others
  keep it, with vLLM's own metadata.
* ``initialize_kv_cache``: decoder layers on a backend the plugin does not wrap fail at startup.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_halluguard.engine.keys import config_of

logger = logging.getLogger(__name__)

_RECORDS = "_halluguard_v2_requests"


class V2Request:
    """What the methods read of a request in a V2 worker (V1's ``CachedRequestState`` names)."""

    def __init__(self, runner: Any, data: Any) -> None:
        self.req_id: str = data.req_id
        self.sampling_params = data.sampling_params
        self.prompt_token_ids: list[int] | None = data.prompt_token_ids
        self.mm_features = data.mm_features
        self.num_computed_tokens: int = data.num_computed_tokens
        self._runner = runner

    @property
    def mrope_positions(self) -> Any:
        """The prompt's M-RoPE positions ``[dims, prompt_len]`` (``None`` for 1-D RoPE models)."""
        rope = getattr(self._runner.model_state, "rope_state", None)
        if rope is None:
            return None
        index = self._runner.req_states.req_id_to_index[self.req_id]
        return rope.read_prefill_positions(index, len(self.prompt_token_ids or ()))


class BatchIndex(Mapping[str, int]):
    """Request id -> row of a V2 step's batch, read through the runner's request-state index
    (``idx_mapping`` inverted once, on first use: no Python work per row)."""

    def __init__(self, state_index: Mapping[str, int], idx_mapping: np.ndarray) -> None:
        self._state_index, self._idx_mapping = state_index, idx_mapping

    @functools.cached_property
    def _rows(self) -> np.ndarray:
        rows = np.full(int(self._idx_mapping.max(initial=-1)) + 1, -1, dtype=np.int64)
        rows[self._idx_mapping] = np.arange(len(self._idx_mapping))
        return rows

    def __getitem__(self, req_id: str) -> int:
        state = self._state_index[req_id]
        row = int(self._rows[state]) if state < len(self._rows) else -1
        if row < 0:
            raise KeyError(req_id)
        return row

    def __iter__(self) -> Iterator[str]:
        return (r for r in self._state_index if r in self)

    def __len__(self) -> int:
        return len(self._idx_mapping)


@dataclass(frozen=True)
class StepRows:
    """A V2 step's rows in batch order (what the runtime and the methods read of V1's batch)."""

    req_ids: list[str]
    num_reqs: int
    req_id_to_index: Mapping[str, int]


def records(runner: Any) -> dict[str, V2Request]:
    """The runner's mitigated requests (plain requests are not kept)."""
    return runner.__dict__.setdefault(_RECORDS, {})


def keep_records(runner: Any, scheduler_output: Any) -> None:
    """Keep a :class:`V2Request` for each new request that selects a method."""
    table = records(runner)
    for data in scheduler_output.scheduled_new_reqs:
        if config_of(data) is not None:
            table[data.req_id] = V2Request(runner, data)


def follow_step(runner: Any, scheduler_output: Any, batch: Any) -> None:
    """Sync the runtime with a V2 step whose rows vLLM ordered (``batch``: its ``BatchReqState``):
    the mitigated records' computed tokens, then :func:`~vllm_halluguard.engine.runtime.sync_step`."""
    from vllm_halluguard.engine.runtime import sync_step

    table = records(runner)
    state_index = runner.req_states.req_id_to_index
    computed = runner.req_states.num_computed_tokens_np
    for req_id, record in table.items():  # mitigated requests only
        index = state_index.get(req_id)
        if index is not None:
            record.num_computed_tokens = int(computed[index])
    rows = StepRows(batch.req_ids, len(batch.req_ids), BatchIndex(state_index, batch.idx_mapping_np))
    sync_step(runner, scheduler_output, rows, table)


@functools.cache
def install_step_hooks() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_halluguard.engine.state import current

    add_requests = GPUModelRunner.add_requests
    finish_requests = GPUModelRunner.finish_requests
    gather = GPUModelRunner.gather_batch_req_state

    @functools.wraps(add_requests)
    def _add_requests(self: Any, scheduler_output: Any) -> None:
        add_requests(self, scheduler_output)
        keep_records(self, scheduler_output)

    @functools.wraps(finish_requests)
    def _finish_requests(self: Any, scheduler_output: Any) -> None:
        finish_requests(self, scheduler_output)
        runtime = self.__dict__.get("_halluguard_runtime")
        if runtime is not None:  # a step that schedules no token never reaches the gather hook
            runtime.retire(scheduler_output)
        table = records(self)
        for req_id in (*scheduler_output.finished_req_ids, *(scheduler_output.preempted_req_ids or ())):
            table.pop(req_id, None)

    @functools.wraps(gather)
    def _gather_batch_req_state(self: Any, scheduler_output: Any, dummy_run: bool) -> Any:
        result = gather(self, scheduler_output, dummy_run)
        batch = result[0]
        if batch is None:  # a dummy run: no request of ours in it
            runtime = self.__dict__.get("_halluguard_runtime")
            if runtime is not None and current() is runtime:
                runtime.step = None
            return result
        follow_step(self, scheduler_output, batch)
        return result

    GPUModelRunner.add_requests = _add_requests
    GPUModelRunner.finish_requests = _finish_requests
    GPUModelRunner.gather_batch_req_state = _gather_batch_req_state


def non_full_descriptor(manager: Any, num_reqs: int, num_tokens: int, uniform_token_count: Any,
                        num_active_loras: int, max_query_len: Any, num_ubatches: int) -> Any:  # fmt: skip
    """The descriptor ``manager.dispatch`` would pick with FULL graphs left out: the first compatible
    non-FULL candidate (piecewise), else eager."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu import cudagraph_utils

    loras = manager._resolve_effective_loras(num_active_loras)
    for cand in manager._candidates.get((num_tokens, loras), ()):
        if cand.cg_mode != CUDAGraphMode.FULL and cudagraph_utils._is_compatible(
            cand, num_reqs, num_tokens, uniform_token_count, loras, max_query_len, num_ubatches
        ):
            return cand
    return cudagraph_utils.BatchExecutionDescriptor(
        cg_mode=CUDAGraphMode.NONE,
        num_tokens=num_tokens,
        num_reqs=num_reqs,
        num_active_loras=loras,
        num_ubatches=num_ubatches,
    )


@functools.cache
def install_cudagraph_guard() -> None:
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from vllm_halluguard.engine.guards import invalid_cudagraph_modes
    from vllm_halluguard.engine.state import current

    original = CudaGraphManager.dispatch

    @functools.wraps(original)
    def dispatch(
        self: Any,
        num_reqs: int,
        num_tokens: int,
        uniform_token_count: int | None,
        num_active_loras: int,
        max_query_len: int | None = None,
        num_ubatches: int = 1,
    ) -> Any:
        desc = original(self, num_reqs, num_tokens, uniform_token_count, num_active_loras,
                        max_query_len, num_ubatches)  # fmt: skip
        if desc.cg_mode == CUDAGraphMode.FULL and invalid_cudagraph_modes(current()):
            desc = non_full_descriptor(self, num_reqs, num_tokens, uniform_token_count,
                                       num_active_loras, max_query_len, num_ubatches)  # fmt: skip
        return desc

    CudaGraphManager.dispatch = dispatch


@functools.cache
def install_backend_check() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_halluguard.engine.guards import refuse_unsupported_backends

    original = GPUModelRunner.initialize_kv_cache

    @functools.wraps(original)
    def initialize_kv_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        refuse_unsupported_backends(self.attn_groups)
        return result

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
