"""Where the worker follows the model runner's steps: V1's ``_update_states`` here, V2's hooks in
:mod:`.runner_v2`; both call :func:`.runtime.sync_step`."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def ensure_runner_hook() -> None:
    """Follow the model runner's steps (installed lazily by the wrapped metadata builders, i.e. in
    workers only): V1 after it updates its persistent batch; V2 (:mod:`.runner_v2`) after it orders
    the step's rows. With it, the worker's side of PruneHal's block reclaim and the
    ``halluguard_worker_stats`` RPC."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_halluguard.engine import reclaim, runner_v2
    from vllm_halluguard.engine.runtime import install_worker_rpc, sync_step

    reclaim.install_worker()
    install_worker_rpc()

    original = GPUModelRunner._update_states

    @functools.wraps(original)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)
        sync_step(self, scheduler_output, self.input_batch, self.requests)
        return result

    GPUModelRunner._update_states = _update_states
    runner_v2.install_step_hooks()
