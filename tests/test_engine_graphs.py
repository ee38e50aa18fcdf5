"""Without an engine: which steps keep vLLM's full CUDA graphs, decided by the worker's real
:class:`~vllm_halluguard.engine.runtime.Runtime` from a step's host data and applied by vLLM's own
dispatchers (V1 ``CudagraphDispatcher``, V2 ``CudaGraphManager``) and the wrapped metadata builder."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

from helpers.worker import (
    FARSIGHT_C,
    HEADS,
    IMAGE_TOKEN,
    KVSMOOTH,
    LAYERS,
    PRUNEHAL,
    cached,
    make_runtime,
    v2_graph_manager,
)
from vllm_halluguard.engine import hooks, registry, state
from vllm_halluguard.engine.base import Backend, RowSpan
from vllm_halluguard.engine.plan import BuilderMixin, StepPlan
from vllm_halluguard.engine.prunehal import PruneState
from vllm_halluguard.engine.runtime import Runtime
from vllm_halluguard.engine.scr import worker as scr_worker
from vllm_halluguard.engine.state import RequestState, Row
from vllm_halluguard.methods import (
    Composition,
    FarSightConfig,
    KVSmoothConfig,
    SCRConfig,
)
from vllm_halluguard.methods.scr import Selection


class Step:
    """One engine step as the runtime sees it on V1: the scheduler's output, the persistent batch
    (``req_ids`` in batch order, ``req_id_to_index``) and the runner's request records."""

    def __init__(self, requests: dict[str, SimpleNamespace], tokens: dict[str, int], new: tuple[str, ...]):
        ids = list(tokens)
        self.requests = requests
        self.batch = SimpleNamespace(
            req_ids=ids, num_reqs=len(ids), req_id_to_index={r: i for i, r in enumerate(ids)}
        )
        self.output = SimpleNamespace(
            finished_req_ids=set(),
            preempted_req_ids=set(),
            num_scheduled_tokens=dict(tokens),
            total_num_scheduled_tokens=sum(tokens.values()),
            scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
            scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()),
        )

    def run(self, runtime: Runtime) -> None:
        runtime.update(self.output, self.batch, self.requests)


def decode_step(mitigated: dict[str, tuple], plain: int = 3) -> Step:
    """A uniform decode step: ``plain`` plain rows, then one row per ``mitigated`` entry
    (``name: (config, prompt)``), each admitted in this step with its prompt computed."""
    requests = {f"plain{i}": cached(f"plain{i}", computed=12) for i in range(plain)}
    for name, (cfg, prompt) in mitigated.items():
        requests[name] = cached(name, cfg, prompt, computed=len(prompt))
    return Step(requests, dict.fromkeys(requests, 1), new=tuple(requests))


IMAGE_PROMPT = [1, 2, *[IMAGE_TOKEN] * 6, 3, 4]

#: name -> (the step's mitigated rows, whether a full graph may run it)
CASES = {
    "plain": ({}, True),
    "farsight_c_decode": ({"c": (FARSIGHT_C, [1] * 10), "c2": (FARSIGHT_C, [1] * 7)}, True),
    "prunehal_without_image_tokens": ({"p": (PRUNEHAL, [1] * 10)}, True),
    "scr_real_request": (
        {"s": (SCRConfig(top_k=2, lam=1.1, layers=(0,), diag_layers=(1,)), IMAGE_PROMPT)},
        True,
    ),
    "kvsmooth_decode": ({"c": (FARSIGHT_C, [1] * 10), "k": (KVSMOOTH, [1] * 10)}, False),
    "prunehal_decode": ({"p": (PRUNEHAL, IMAGE_PROMPT)}, False),
    "farsight_b_decode": ({"b": (FarSightConfig(mode="B", layers=(1, 2)), [1] * 10)}, False),
    "composed_kvsmooth": ({"ck": (Composition(members=(FARSIGHT_C, KVSMOOTH)), [1] * 10)}, False),
}


def _v1_dispatcher() -> CudagraphDispatcher:
    """vLLM 0.32's GPU default: FULL graphs for uniform decode, piecewise otherwise."""
    from vllm.config import CompilationMode

    config = VllmConfig()
    cc = config.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.splitting_ops = list(cc._attention_ops)
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cc.cudagraph_capture_sizes, cc.max_cudagraph_capture_size = [1, 2, 4, 8], 8
    d = CudagraphDispatcher(config)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    return d


def _v2_manager() -> CudaGraphManager:
    """V2's manager with the candidates vLLM builds for FULL_AND_PIECEWISE, as if captured."""
    return v2_graph_manager(CUDAGraphMode.FULL_AND_PIECEWISE)


def _common(num_reqs: int) -> CommonAttentionMetadata:
    """vLLM's common metadata of a decode batch of ``num_reqs`` rows (prompt of 10, first token)."""
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32)
    seq = torch.full((num_reqs,), 11, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=seq,
        num_reqs=num_reqs,
        num_actual_tokens=num_reqs,
        max_query_len=1,
        max_seq_len=11,
        block_table_tensor=torch.arange(num_reqs, dtype=torch.int32).view(num_reqs, 1),
        slot_mapping=torch.arange(num_reqs, dtype=torch.int64),
        positions=torch.full((num_reqs,), 10),
        seq_lens_cpu_upper_bound=seq.clone(),
    )


def _builder():
    """The plugin's metadata builder over a native builder that records its calls."""
    calls: list[bool] = []

    class Native:
        def build(self, prefix: int, cm: CommonAttentionMetadata, fast_build: bool = False):
            calls.append(fast_build)
            return SimpleNamespace(native=True)

    cls = type("Wrapped", (BuilderMixin, Native), {"_hg_native_sinks": False})
    b = object.__new__(cls)
    b._hg_decoder, b._hg_kernel, b._hg_num_heads = True, False, HEADS
    return b, calls


@pytest.fixture
def guard():
    hooks.install_cudagraph_guard()
    yield
    state.set_current(None)


@pytest.mark.parametrize("case", CASES)
def test_full_graphs_are_kept_exactly_for_steps_that_need_nothing_from_attention(guard, case):
    """The runtime decides from the step's host data (before the dispatch, as ``sync_step`` runs), and
    vLLM's V1 dispatcher and V2 manager pick FULL graphs only where no row needs the plugin; the builder
    then hands vLLM's own metadata (as vLLM called it) to a FULL step and a plan to the others."""
    mitigated, full = CASES[case]
    step = decode_step(mitigated)
    runtime = make_runtime()
    state.set_current(runtime)
    # SCR's diagnostic pass chose the real request's sources
    scr_worker(runtime).selections["s"] = Selection(torch.tensor([[3, -1]]), torch.full((1, 9), -1))
    step.run(runtime)
    n = step.batch.num_reqs
    assert (runtime.step is not None) == bool(mitigated), "mitigated rows are in the step's view"
    if case == "scr_real_request":
        assert "scr_edit" in runtime.step.rows[0].request.scratch

    mode, _ = _v1_dispatcher().dispatch(num_tokens=n, uniform_decode=True)
    assert (mode == CUDAGraphMode.FULL) == full and mode != CUDAGraphMode.NONE
    v2 = _v2_manager().dispatch(n, n, 1, 0)
    assert (v2.cg_mode == CUDAGraphMode.FULL) == full and v2.cg_mode != CUDAGraphMode.NONE

    builder, calls = _builder()
    meta = builder.build(0, _common(n), fast_build=False)
    if full:
        assert meta == SimpleNamespace(native=True) and calls == [False], "vLLM's own build, as called"
    else:
        assert isinstance(meta, StepPlan)


def test_a_farsight_c_request_needs_attention_while_its_prompt_is_computed(guard):
    """The same request that keeps FULL graphs in decode keeps them out in its prefill chunks."""
    runtime = make_runtime()
    state.set_current(runtime)
    requests = {"plain": cached("plain", computed=12), "c": cached("c", FARSIGHT_C, [1] * 10, computed=4)}
    Step(requests, {"plain": 1, "c": 6}, new=("c",)).run(runtime)  # the prompt's last chunk
    assert runtime.step is not None and runtime.step.needs_attention
    assert hooks.invalid_cudagraph_modes(runtime) == {CUDAGraphMode.FULL}
    requests["c"].num_computed_tokens = 10
    Step(requests, {"plain": 1, "c": 1}, new=()).run(runtime)  # its first decode step
    assert runtime.step is not None and not runtime.step.needs_attention
    assert hooks.invalid_cudagraph_modes(runtime) is None


def test_a_step_forced_to_full_graphs_gets_vllms_metadata(guard):
    """A FULL mode forced on the dispatcher from outside (the data-parallel sync) cannot run the plan:
    the builder then builds vLLM's own metadata, which the full graph replays."""
    step = decode_step({"k": (KVSMOOTH, [1] * 10)})
    runtime = make_runtime()
    state.set_current(runtime)
    step.run(runtime)
    n = step.batch.num_reqs
    mode, _ = _v1_dispatcher().dispatch(num_tokens=n, uniform_decode=True, valid_modes={CUDAGraphMode.FULL})
    assert mode == CUDAGraphMode.FULL
    builder, calls = _builder()
    assert builder.build(0, _common(n)) == SimpleNamespace(native=True) and calls == [False]


def _rows_of_every_kind() -> list[Row]:
    """Rows of every method in the states their admissions give (with and without image tokens)."""
    visual = torch.arange(2, 8)
    prune = RequestState("p", 0, PRUNEHAL, 10)
    prune.scratch["prunehal"] = PruneState.fresh(visual, (1, 2, 3), {})
    pruned = RequestState("q", 1, PRUNEHAL, 10)
    pruned.scratch["prunehal"] = st = PruneState.fresh(visual, (1, 2, 3), {})
    st.keep[1, ::2] = False
    no_image = RequestState("n", 2, PRUNEHAL, 10)
    no_image.scratch["prunehal"] = PruneState.fresh(torch.zeros(0, dtype=torch.long), (1, 2, 3), {})
    scr = SCRConfig(top_k=2, lam=1.1, layers=(0,), diag_layers=(1,))
    diag = RequestState("d", 3, scr, 10)
    diag.scratch["scr_diag"] = object()
    real = RequestState("s", 4, scr, 10)
    real.scratch["scr_edit"] = object()
    configs = [
        FARSIGHT_C,
        FarSightConfig(mode="A", layers=(0, 1)),
        FarSightConfig(mode="B", layers=(1, 2)),
        FarSightConfig(mode="B", layers=(1,), sigma=float("inf")),
        KVSMOOTH,
        KVSmoothConfig(lam_ref=0.5, layers=(1,), head_reduce="entropy_of_mean"),
    ]
    states = [RequestState(f"r{i}", 5 + i, cfg, 10) for i, cfg in enumerate(configs)]
    return [Row(0, s) for s in (prune, pruned, no_image, diag, real, *states)]


def test_a_row_said_to_need_nothing_is_native_and_unobserved_on_every_backend():
    """The predicate the dispatch relies on never drops work the builder would plan: wherever a method
    says a row needs nothing, its route is native and it observes nothing, on every backend."""
    checked = needed = 0
    for row in _rows_of_every_kind():
        method = registry.method_of(row.request.config)
        for n, computed in itertools.product((1, 3), (0, 4, 7, 9, 10, 11, 20)):
            span = RowSpan(5, 5 + n, computed + n)
            if method.needs_attention(row, RowSpan(0, n, computed + n)):
                needed += 1
                continue
            for kernel, sinks in itertools.product((False, True), repeat=2):
                backend = Backend(kernel=kernel, native_sinks=sinks, num_layers=LAYERS, num_heads=HEADS)
                route = method.route(row, span, backend)
                assert not route.rework and route.sinks is None, (row.request.config, n, computed)
                assert not method.observes(row, span, backend), (row.request.config, n, computed)
                checked += 1
    assert checked > 50 and needed > 50, "both kinds of rows were met"
