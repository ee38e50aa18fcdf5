"""Without an engine: the CUDA-graph dispatch decision of the V2 runner's ``CudaGraphManager``, and the
settings that split a step, refused at admission (the engine suites run on V2 and with async
scheduling in ``tests/test_engine_modes.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

from helpers.worker import v2_graph_manager
from vllm_halluguard.engine import hooks, state
from vllm_halluguard.engine.requests import check_inputs
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.methods import KVSmoothConfig, PruneHalConfig, SpecError


def _manager(mode: CUDAGraphMode) -> CudaGraphManager:
    """vLLM's manager with the candidates vLLM builds for ``mode`` and sizes 1..8, as if captured."""
    return v2_graph_manager(mode)


@pytest.fixture
def mitigated_step():
    hooks.install_cudagraph_guard()
    row = Row(0, RequestState("r", 0, KVSmoothConfig(), 10))
    yield lambda on: state.set_current(SimpleNamespace(step=StepView(3, (row,)) if on else None))
    state.set_current(None)


def test_full_graphs_kept_for_plain_steps_and_piecewise_for_mitigated_ones(mitigated_step):
    m = _manager(CUDAGraphMode.FULL_AND_PIECEWISE)
    mitigated_step(False)
    plain = m.dispatch(3, 3, 1, 0)  # a uniform decode of 3 rows: vLLM replays the FULL graph of 4
    assert (plain.cg_mode, plain.num_tokens, plain.num_reqs) == (CUDAGraphMode.FULL, 4, 4)
    mitigated_step(True)
    desc = m.dispatch(3, 3, 1, 0)
    assert (desc.cg_mode, desc.num_tokens, desc.num_reqs) == (CUDAGraphMode.PIECEWISE, 4, None)


def test_mitigated_step_runs_eager_where_only_full_graphs_exist(mitigated_step):
    m = _manager(CUDAGraphMode.FULL)
    mitigated_step(False)
    assert m.dispatch(3, 3, 1, 0).cg_mode == CUDAGraphMode.FULL
    mitigated_step(True)
    desc = m.dispatch(3, 3, 1, 0)
    assert (desc.cg_mode, desc.num_tokens, desc.num_reqs) == (CUDAGraphMode.NONE, 3, 3)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("enable_dbo", True, "micro-batching"),
        ("ubatch_size", 2, "micro-batching"),
        ("prefill_context_parallel_size", 2, "prefill context parallelism"),
        ("decode_context_parallel_size", 2, "decode context parallelism"),
    ],
)
def test_settings_that_split_a_step_are_refused_at_admission(field, value, needle):
    config = VllmConfig()
    check_inputs(KVSmoothConfig(), [], 10, config)  # the default settings are served
    setattr(config.parallel_config, field, value)
    with pytest.raises(SpecError, match=needle) as e:
        check_inputs(KVSmoothConfig(), [], 10, config)
    assert e.value.reason == "unsupported"


@pytest.mark.parametrize(("v2", "async_scheduling"), [(False, False), (True, False), (False, True)])
def test_prunehal_block_reclaim_needs_v1_and_synchronous_scheduling(monkeypatch, v2, async_scheduling):
    # The reclaim nulls entries of V1's block table and rides V1's model-runner output; under async
    # scheduling its reports arrive a step late (not served).
    config, image = VllmConfig(), [SimpleNamespace(modality="image")]
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: v2))
    config.scheduler_config.async_scheduling = async_scheduling
    check_inputs(PruneHalConfig(), image, 10, config)  # the paper's per-layer selection: every setting
    reclaiming = PruneHalConfig(selection="shared")
    if not (v2 or async_scheduling):
        check_inputs(reclaiming, image, 10, config)
        return
    with pytest.raises(SpecError, match="V1 model runner" if v2 else "synchronous scheduling") as e:
        check_inputs(reclaiming, image, 10, config)
    assert e.value.reason == "unsupported"
