"""Where the worker follows the model runner's steps: V1's ``_update_states`` (and its dummy runs) here,
V2's hooks in :mod:`.runner_v2`; both call :func:`.runtime.sync_step`."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def ensure_runner_hook() -> None:
    """Follow the model runner's steps (installed lazily by the wrapped metadata builders, i.e. in
    workers only): V1 after it updates its persistent batch; V2 (:mod:`.runner_v2`) after it orders
    the step's rows. With it, the worker's side of PruneHal's block reclaim, the
    ``halluguard_worker_stats`` RPC and the kernel's start-up compile (:mod:`.warmup`)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_halluguard.engine import reclaim, runner_v2, warmup
    from vllm_halluguard.engine.runtime import install_worker_rpc, sync_step

    reclaim.install_worker()
    install_worker_rpc()
    warmup.install()  # the Triton kernel's specialisations compiled before serving (GPU workers)

    original = GPUModelRunner._update_states

    @functools.wraps(original)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)
        sync_step(self, scheduler_output, self.input_batch, self.requests)
        return result

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._dummy_run = clear_view_on_dummy_run(GPUModelRunner._dummy_run)
    runner_v2.install_step_hooks()


def clear_view_on_dummy_run(dummy_run: Any) -> Any:
    """V1's ``_dummy_run`` with the runner's step view cleared first: a dummy batch (an idle data-parallel
    rank's ``execute_dummy_batch``, warm-up, graph capture) holds no request of ours. A view left over
    from the rank's last mitigated step would keep FULL graphs out of the dummy's dispatch, and the
    data-parallel sync takes the smallest mode of all ranks (``dp_utils._post_process_cudagraph_mode``),
    so every rank would run without them (V2 clears it in ``gather_batch_req_state``)."""

    @functools.wraps(dummy_run)
    def _dummy_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = self.__dict__.get("_halluguard_runtime")
        if runtime is not None:
            runtime.step = None
        return dummy_run(self, *args, **kwargs)

    return _dummy_run
