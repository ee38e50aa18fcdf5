"""Run the engine suites on CPU in the modes GPUs default to: vLLM's V2 model runner, async scheduling.

``HALLUGUARD_TEST_ENGINE_MODE`` (comma-separated) selects them for a test session; the test
configuration applies it before vLLM is imported (:func:`apply`), and every engine the session
starts is checked to really run in it (:func:`check_engine`).

* ``v2``: ``VLLM_USE_V2_MODEL_RUNNER=1``. vLLM's CPU build only takes the V2 runner with a Triton that
  has a CPU backend (``vllm.triton_utils`` disables Triton otherwise, and ``VllmConfig`` refuses V2:
  "Model Runner V2 requires Triton."). PyPI's triton has none, so the test session gives vLLM's
  Triton check a stand-in ``cpu`` backend entry and runs V2's Triton kernels (input preparation, slot
  mappings, sampling) in Triton's interpreter (``TRITON_INTERPRET=1``, with the cheaper
  device-function call of :mod:`helpers.triton_interp`). The model, attention and the plugin run as
  they do on V1.
* ``async``: ``async_scheduling=True``. vLLM's CPU platform switches it off in
  ``CpuPlatform.check_and_update_config`` ("not required on CPU");
  :func:`keep_explicit_async_scheduling_on_cpu` keeps it for an engine built with an explicit
  ``async_scheduling=True``, so its engine core plans step N+1 before step N's output is processed
  (``AsyncScheduler`` and a batch queue of 2), as on GPUs. Every other engine is configured as
  before, so the main test session also builds async engines in process (``EnginePool`` keys with
  ``async_scheduling=True``, tests/test_engine_modes.py).
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Iterable
from typing import Any

MODE_ENV = "HALLUGUARD_TEST_ENGINE_MODE"
MODES = ("v2", "async")


def selected() -> frozenset[str]:
    raw = os.environ.get(MODE_ENV, "")
    modes = frozenset(m.strip() for m in raw.split(",") if m.strip())
    unknown = modes - set(MODES)
    if unknown:
        raise ValueError(f"{MODE_ENV}: unknown mode(s) {sorted(unknown)}; known: {MODES}")
    return modes


def engine_overrides() -> dict[str, Any]:
    """Engine arguments the selected modes add to every test engine."""
    return {"async_scheduling": True} if "async" in selected() else {}


def apply() -> frozenset[str]:
    """Set the selected modes up; call before anything imports vLLM."""
    modes = selected()
    if "v2" in modes:
        _interpreted_triton_for_vllm()
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    if "async" in modes:
        keep_explicit_async_scheduling_on_cpu()
    return modes


class _InterpreterDriver:
    """Stands in for a Triton CPU driver in vLLM's check: kernels run in Triton's interpreter."""

    @staticmethod
    def is_active() -> bool:
        return False


def _interpreted_triton_for_vllm() -> None:
    import sys

    if "vllm.triton_utils" in sys.modules:
        raise RuntimeError("the V2 test mode must be applied before vLLM is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.backends import Backend, backends

    from helpers import triton_interp

    backends.setdefault("cpu", Backend(compiler=None, driver=_InterpreterDriver))  # type: ignore[arg-type]
    triton_interp.install()  # the same interpretation, without re-patching at each device call


#: True while ``EngineArgs.create_engine_config`` builds the config of an engine whose arguments ask
#: for ``async_scheduling=True`` (vLLM resolves its default ``None`` to True before the platform check,
#: so the config alone cannot tell an explicit request from the default).
_EXPLICIT_ASYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("explicit_async", default=False)


@functools.cache
def keep_explicit_async_scheduling_on_cpu() -> None:
    """Let an engine built with ``async_scheduling=True`` keep it on vLLM's CPU platform.

    An engine without that argument is configured exactly as before (the platform switches it off).
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform

    create = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _EXPLICIT_ASYNC.set(self.async_scheduling is True)
        try:
            return create(self, *args, **kwargs)
        finally:
            _EXPLICIT_ASYNC.reset(token)

    check = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        check(cls, vllm_config)
        if _EXPLICIT_ASYNC.get():
            vllm_config.scheduler_config.async_scheduling = True

    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[assignment]


def check_engine(llm: Any, modes: Iterable[str] | None = None) -> None:
    """Fail if an in-process test engine does not run in ``modes`` (default: the selected ones)."""
    modes = selected() if modes is None else frozenset(modes)
    core = llm.llm_engine.engine_core.engine_core
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    if ("v2" in modes) != isinstance(runner, V2Runner):
        raise RuntimeError(f"engine runs {type(runner).__module__}, modes {sorted(modes)}")
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    is_async = isinstance(core.scheduler, AsyncScheduler) and core.batch_queue is not None
    if ("async" in modes) != is_async:
        raise RuntimeError(f"engine scheduler {type(core.scheduler).__name__}, modes {sorted(modes)}")
