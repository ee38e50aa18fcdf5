"""The native-first partition, without an engine: sub-batch metadata, each method's route, the per-layer
plan, and the CUDA-graph dispatch decision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

from vllm_halluguard.engine import hooks, state
from vllm_halluguard.engine.base import Backend
from vllm_halluguard.engine.plan import build_plan, sub_common
from vllm_halluguard.engine.prunehal import PruneState
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.methods import FarSightConfig, KVSmoothConfig, PruneHalConfig

LAYERS, HEADS = 4, 4
# batch: row -> (query tokens, sequence length after the step)
ROWS = [(1, 40), (5, 5), (1, 33), (7, 20), (1, 61), (1, 12)]


def _common() -> CommonAttentionMetadata:
    lens = torch.tensor([q for q, _ in ROWS], dtype=torch.int32)
    qsl = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    seq = torch.tensor([s for _, s in ROWS], dtype=torch.int32)
    t = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=seq,
        num_reqs=len(ROWS),
        num_actual_tokens=t,
        max_query_len=int(lens.max()),
        max_seq_len=int(seq.max()),
        block_table_tensor=torch.arange(len(ROWS) * 4, dtype=torch.int32).view(len(ROWS), 4) * 10,
        slot_mapping=torch.arange(t, dtype=torch.int64) + 1000,
        positions=torch.arange(t) + 500,
        seq_lens_cpu_upper_bound=seq.clone(),
    )


def test_sub_common_keeps_exactly_the_rows_it_names():
    cm = _common()
    rows = [1, 3, 4]
    tokens = torch.tensor([1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14])
    sub = sub_common(cm, rows, tokens, len(tokens))
    assert sub.num_reqs == 3 and sub.num_actual_tokens == 13 and sub.max_query_len == 7
    assert sub.query_start_loc_cpu.tolist() == [0, 5, 12, 13]
    assert torch.equal(sub.query_start_loc, sub.query_start_loc_cpu)
    assert sub.seq_lens.tolist() == [5, 20, 61]
    assert torch.equal(sub.block_table_tensor, cm.block_table_tensor[rows])
    assert sub.slot_mapping.tolist() == (tokens + 1000).tolist()
    assert sub.positions.tolist() == (tokens + 500).tolist()
    assert sub.seq_lens_cpu_upper_bound.tolist() == [5, 20, 61]
    assert cm.num_reqs == len(ROWS), "the batch's own metadata is untouched"


def _rows() -> StepView:
    """Row 0 plain, 1 FarSight C (prefill: prompt rows), 2 FarSight B, 3 plain (prefill), 4 PruneHal
    (decode, pruned in layer 2 only), 5 KVSmooth (decode)."""
    farsight_c = FarSightConfig(mode="C", layers=tuple(range(LAYERS)))
    farsight_b = FarSightConfig(mode="B", layers=(1, 2))
    prunehal = PruneHalConfig(r=0.5, t=2, layers=(1, 2, 3))
    kvsmooth = KVSmoothConfig(lam_ref=0.5, layers=(1, 2))
    prune = RequestState("p", 3, prunehal, 50)
    st = PruneState.fresh(torch.arange(4, 36), (1, 2, 3), {})
    st.keep[1, ::2] = False  # layer 2 (index 1 of the config's layers) has pruned keys,
    st.host_keep[1, ::2] = False  # as the host read it after the step that decided it
    st.host_kept[1], st.pruned_layers = False, frozenset({2})
    prune.scratch["prunehal"] = st
    return StepView(
        len(ROWS),
        (
            Row(1, RequestState("c", 0, farsight_c, 5)),
            Row(2, RequestState("b", 1, farsight_b, 20)),
            Row(4, prune),
            Row(5, RequestState("k", 2, kvsmooth, 10)),
        ),
    )


class Recorder:
    """A stand-in for the native builder's ``build``: records the rows of each metadata it builds."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, prefix: int, cm: CommonAttentionMetadata) -> SimpleNamespace:
        rows = cm.seq_lens.tolist()
        self.calls.append((prefix, rows))
        return SimpleNamespace(seq_lens=rows)


def _seq_rows(batch) -> list[int]:
    return [ROWS[r][1] for r in batch.rows]


def test_torch_path_partitions_reworked_and_sink_rows_out_of_the_native_kernel():
    build = Recorder()
    stats = {"farsight_native_rows": 0}
    backend = Backend(kernel=False, native_sinks=True, num_layers=LAYERS, num_heads=HEADS)
    plan = build_plan(build, 7, _common(), _rows(), backend, stats)
    # FarSight B: its own native sub-batch with per-head sinks in its layers, never in the main one
    (lane,) = plan.sink_lanes
    assert lane.batch.rows == [2] and lane.layers == frozenset({1, 2}) and lane.sinks.shape == (HEADS,)
    assert stats["farsight_native_rows"] == 1
    # FarSight C's prompt rows are reworked in every layer; PruneHal only where it pruned (layer 2);
    # KVSmooth keeps the native output on the torch path
    for layer in (0, 1, 3):
        lp = plan.layer(layer)
        assert [r.index for r in lp.rework] == [1] and lp.native.rows == [0, 3, 4, 5] and lp.kernel is None
    lp2 = plan.layer(2)
    assert [r.index for r in lp2.rework] == [1, 4] and lp2.native.rows == [0, 3, 5]
    assert plan.full is None, "no layer runs the whole batch natively"
    # one native build per distinct row set, none for the whole batch; sub-batches start with no prefix
    built = sorted(rows for _, rows in build.calls)
    assert built == sorted([[33], _seq_rows(plan.layer(0).native), _seq_rows(lp2.native)])
    assert all(prefix == 0 for prefix, _ in build.calls)
    assert plan.layer(0) is plan.layer(3), "layers with the same rework set share one plan"
    # the native rows' tokens: rows 0, 3, 4, 5 are not contiguous -> an index tensor
    assert plan.layer(0).native.tokens.tolist() == [0, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert [r.index for r in plan.by_method["prunehal"]] == [4] and plan.in_sink_lanes == {2}


def test_kernel_path_sends_every_row_with_kernel_work_to_one_launch():
    build = Recorder()
    backend = Backend(kernel=True, native_sinks=False, num_layers=LAYERS, num_heads=HEADS)
    plan = build_plan(build, 0, _common(), _rows(), backend)
    assert plan.sink_lanes == []
    expect = {0: [1], 1: [1, 2, 4, 5], 2: [1, 2, 4, 5], 3: [1, 4]}  # C; B + PruneHal + KVSmooth layers
    for layer, rows in expect.items():
        lp = plan.layer(layer)
        assert [r.index for r in lp.rework] == rows
        assert lp.native.rows == [i for i in range(len(ROWS)) if i not in rows]
        k = lp.kernel
        assert k is not None and k.rows == rows
        qlens = [ROWS[r][0] for r in rows]
        assert k.query_start_loc.tolist() == [0, *torch.tensor(qlens).cumsum(0).tolist()]
        assert k.seq_lens.tolist() == [ROWS[r][1] for r in rows]
        assert k.block_table.dtype == torch.int32 and k.block_table.shape[0] == len(rows)


def test_a_step_without_reworked_rows_runs_the_whole_batch_natively():
    build = Recorder()
    kvsmooth = KVSmoothConfig(lam_ref=0.5, layers=(1, 2))
    view = StepView(len(ROWS), (Row(5, RequestState("k", 2, kvsmooth, 10)),))
    backend = Backend(kernel=False, native_sinks=True, num_layers=LAYERS, num_heads=HEADS)
    plan = build_plan(build, 7, _common(), view, backend)
    assert plan.default.native is None and plan.layers == {} and plan.full is not None
    assert build.calls == [(7, [s for _, s in ROWS])], "vLLM's own metadata, built once, prefix kept"
    assert plan.quiet == {0, 3}, "KVSmooth's rows are observed in its smoothed layers only"


def test_a_layer_no_method_observes_runs_the_native_kernel_alone(monkeypatch):
    """In a quiet layer (no reworked row, no observed row) the layer call is the native kernel's and
    nothing else: no method hook, no cache access."""
    from vllm_halluguard.engine import execute
    from vllm_halluguard.engine.registry import named

    kvsmooth = KVSmoothConfig(lam_ref=0.5, layers=(1, 2))
    view = StepView(len(ROWS), (Row(5, RequestState("k", 2, kvsmooth, 10)),))
    backend = Backend(kernel=False, native_sinks=True, num_layers=LAYERS, num_heads=HEADS)
    plan = build_plan(Recorder(), 7, _common(), view, backend)
    hooked: list[int] = []
    monkeypatch.setattr(named("kvsmooth"), "run", lambda call, rows: hooked.append(call.layer))
    monkeypatch.setattr(execute, "cache_io", lambda *a: pytest.fail("a quiet layer reads no cache"))
    natives: list[object] = []

    def native(layer, q, k, v, cache, meta, out, *args, **kwargs):
        natives.append(meta)
        return out

    out = torch.zeros(plan.num_actual_tokens, HEADS * 8)
    for index in (0, 3):
        layer = SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn")
        got = execute.run_layer(
            SimpleNamespace(), native, layer, torch.zeros(0), None, None, torch.zeros(0), plan, out, (), {}
        )
        assert got is out
    assert natives == [plan.full, plan.full] and hooked == []


@pytest.fixture
def dispatcher():
    config = VllmConfig()
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    config.compilation_config.cudagraph_capture_sizes = [1, 2, 4, 8]
    config.compilation_config.max_cudagraph_capture_size = 8
    d = CudagraphDispatcher(config)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL, 1)
    hooks.install_cudagraph_guard()
    yield d
    state.set_current(None)


def test_full_cuda_graphs_are_kept_for_plain_steps_and_excluded_for_mitigated_ones(dispatcher):
    assert hooks.invalid_cudagraph_modes(None) is None
    state.set_current(SimpleNamespace(step=None))  # a plain step
    mode, _ = dispatcher.dispatch(num_tokens=4, uniform_decode=True)
    assert mode == CUDAGraphMode.FULL
    state.set_current(SimpleNamespace(step=_rows()))  # a step with mitigated rows
    mode, _ = dispatcher.dispatch(num_tokens=4, uniform_decode=True)
    assert mode == CUDAGraphMode.NONE
    assert hooks.invalid_cudagraph_modes(state.current()) == {CUDAGraphMode.FULL}


class _Dispatched(Exception):
    """Raised once V1's ``_dummy_run`` is past its CUDA-graph dispatch and data-parallel sync."""


class _IdleRank:
    """The attributes V1's ``_dummy_run`` reads of its runner up to the dispatch and the DP sync (the
    real ``_determine_batch_execution_and_padding`` and ``coordinate_batch_across_dp`` run); its next
    read stops the run."""

    def __init__(self, dispatcher: CudagraphDispatcher, runtime: object) -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        self.__dict__["_halluguard_runtime"] = runtime
        self.parallel_config = SimpleNamespace(
            data_parallel_size=2, data_parallel_rank=1, use_ubatching=False, num_ubatches=1,
            disable_nccl_for_dp_synchronization=True,
        )  # fmt: skip
        self.model_config = SimpleNamespace(multimodal_config=None, is_encoder_decoder=False)
        self.vllm_config = SimpleNamespace(
            model_config=self.model_config,
            parallel_config=self.parallel_config,
            observability_config=SimpleNamespace(cudagraph_metrics=False),
        )
        self.uniform_decode_query_len, self.max_num_tokens = 1, 64
        self.scheduler_config = SimpleNamespace(max_num_seqs=8)
        self.input_batch = SimpleNamespace(lora_id_to_lora_request={})
        self.cudagraph_dispatcher = dispatcher
        self._is_uniform_decode = GPUModelRunner._is_uniform_decode
        determine = GPUModelRunner._determine_batch_execution_and_padding.__get__(self)

        def record(*args, **kwargs):
            self.decided = determine(*args, **kwargs)
            return self.decided

        self._determine_batch_execution_and_padding = record

    @property
    def dcp_world_size(self) -> int:
        raise _Dispatched


def test_an_idle_data_parallel_rank_does_not_keep_full_graphs_from_the_others(monkeypatch):
    """V1 + data parallel: a rank with no work runs ``execute_dummy_batch`` (``_dummy_run(1,
    uniform_decode=True)``) while rank 0 runs plain decode rows in a FULL graph, and the DP sync gives
    every rank the smallest mode. The idle rank's last step had mitigated rows: its dummy run must not
    dispatch with that stale view (it would pull rank 0 down to PIECEWISE)."""
    from vllm.config import CompilationMode
    from vllm.v1.worker import dp_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_halluguard.engine.runners import ensure_runner_hook

    config = VllmConfig()  # vLLM 0.32's GPU default: FULL graphs for uniform decode, piecewise otherwise
    config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    config.compilation_config.splitting_ops = list(config.compilation_config._attention_ops)
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    config.compilation_config.cudagraph_capture_sizes = [1, 2, 4, 8]
    config.compilation_config.max_cudagraph_capture_size = 8
    dispatcher = CudagraphDispatcher(config)
    dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    hooks.install_cudagraph_guard()
    ensure_runner_hook()
    busy = {"tokens": 4, "mode": CUDAGraphMode.FULL.value}  # rank 0: plain decode rows, a FULL graph
    sent = []

    def all_reduce(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch, cudagraph_mode,
                   parallel_config):  # fmt: skip
        sent.append(CUDAGraphMode(cudagraph_mode))
        return torch.tensor(
            [[busy["tokens"], orig_num_tokens_per_ubatch], [busy["tokens"], padded_num_tokens_per_ubatch],
             [0, int(should_ubatch)], [busy["mode"], cudagraph_mode]], dtype=torch.int32,
        )  # fmt: skip

    monkeypatch.setattr(dp_utils, "_run_ar", all_reduce)
    runtime = SimpleNamespace(step=_rows())  # the rank's last step had mitigated rows
    state.set_current(runtime)
    try:
        idle = _IdleRank(dispatcher, runtime)
        with pytest.raises(_Dispatched):
            GPUModelRunner._dummy_run(idle, 1, uniform_decode=True)
        assert sent == [CUDAGraphMode.FULL], "the idle rank proposed a mode without FULL graphs"
        assert idle.decided[0] == CUDAGraphMode.FULL  # what every rank runs after the sync
        assert runtime.step is None, "a dummy batch holds no mitigated row"
        # and a real mitigated step on that rank still excludes them
        runtime.step = _rows()
        assert dispatcher.dispatch(num_tokens=1, uniform_decode=True)[0] != CUDAGraphMode.FULL
    finally:
        state.set_current(None)


def test_a_step_whose_rows_need_nothing_from_attention_gets_vllms_own_metadata():
    """FarSight C decode rows (no sink for generated tokens) and SCR's real request (edited in the
    decoder layers, not in attention): no plan, no per-layer work."""
    from vllm_halluguard.methods import SCRConfig

    build = Recorder()
    farsight_c = FarSightConfig(mode="C", layers=tuple(range(LAYERS)))
    scr = SCRConfig(top_k=2, lam=1.1, layers=(0,), diag_layers=(1,))
    view = StepView(
        len(ROWS), (Row(0, RequestState("c", 0, farsight_c, 10)), Row(4, RequestState("s", 1, scr, 30)))
    )
    backend = Backend(kernel=False, native_sinks=True, num_layers=LAYERS, num_heads=HEADS)
    meta = build_plan(build, 7, _common(), view, backend)
    assert isinstance(meta, SimpleNamespace), "vLLM's metadata, not a StepPlan"
    assert build.calls == [(7, [s for _, s in ROWS])]


def test_a_runner_with_a_backend_the_plugin_does_not_wrap_is_named():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    from vllm_halluguard.engine.backends import wrapped

    class Other:
        @staticmethod
        def get_name() -> str:
            return "FLEX_ATTENTION"

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    ours = SimpleNamespace(backend=wrapped("CPU_ATTN"), kv_cache_spec=full)
    assert hooks.unsupported_backends([[ours]]) == []
    other = SimpleNamespace(backend=Other, kv_cache_spec=full)
    not_attention = SimpleNamespace(backend=Other, kv_cache_spec=MambaSpec.__new__(MambaSpec))
    assert hooks.unsupported_backends([[ours, other], [not_attention]]) == ["FLEX_ATTENTION"]


def test_blocks_of_generated_tokens_a_method_rewrote_are_never_shared():
    """KVSmooth smooths generated tokens' cached K/V in place; a later prompt holding the same tokens
    (a multi-turn chat) must compute them raw, as the reference does, so those blocks hash per request.
    Prompt blocks keep one hash per config (shared); plain requests are untouched."""
    from vllm.v1.core import kv_cache_utils

    hooks.install_cache_salt()

    def request(rid: str, spec: str | None) -> SimpleNamespace:
        params = SimpleNamespace(extra_args=None if spec is None else {"halluguard": spec})
        return SimpleNamespace(request_id=rid, sampling_params=params, num_prompt_tokens=32, mm_features=[],
                               lora_request=None, cache_salt=None, prompt_embeds=None)  # fmt: skip

    def keys(req: SimpleNamespace, start: int, end: int):
        return kv_cache_utils.generate_block_hash_extra_keys(req, start, end, 0)[0]

    kvs = '{"method":"kvsmooth","lam_ref":0.9}'
    a, b = request("a", kvs), request("b", kvs)
    assert keys(a, 0, 16) == keys(b, 0, 16) and keys(a, 16, 32) == keys(b, 16, 32)  # the prompt
    assert keys(a, 32, 48) != keys(b, 32, 48)  # generated tokens, rewritten by KVSmooth
    far_a, far_b = (
        request("c", '{"method":"farsight","mode":"B"}'),
        request("d", '{"method":"farsight","mode":"B"}'),
    )
    assert keys(far_a, 32, 48) == keys(far_b, 32, 48), "FarSight does not rewrite the cache"
    assert keys(request("e", None), 32, 48) is None


def test_engine_settings_the_methods_cannot_serve_are_refused_at_admission():
    from vllm_halluguard.engine.requests import check_inputs
    from vllm_halluguard.methods import SCRConfig, SpecError

    def config(tp: int = 1, spec: object = None, pp: int = 1) -> SimpleNamespace:
        return SimpleNamespace(
            speculative_config=spec,
            parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
            scheduler_config=SimpleNamespace(max_num_batched_tokens=2048, long_prefill_token_threshold=0),
            compilation_config=SimpleNamespace(mode=0),
        )

    image = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=2, length=16))
    kvsmooth, scr = (
        KVSmoothConfig(lam_ref=0.5, layers=(1,)),
        SCRConfig(top_k=2, lam=1.1, layers=(0,), diag_layers=(1,)),
    )
    prunehal, farsight = PruneHalConfig(r=0.5, t=2, layers=(1,)), FarSightConfig(mode="B")
    dcp = config()
    dcp.parallel_config.decode_context_parallel_size = 2
    for cfg in (kvsmooth, scr, prunehal, farsight):  # every method reduces its statistics over the ranks
        check_inputs(cfg, [image], 30, config())
        check_inputs(cfg, [image], 30, config(tp=2))
    for cfg, settings, needle in (
        (kvsmooth, config(spec=object()), "speculative decoding"),
        (scr, config(spec=object()), "speculative decoding"),
        *((cfg, config(pp=2), "pipeline_parallel_size=2") for cfg in (kvsmooth, scr, prunehal, farsight)),
        *((cfg, dcp, "context parallelism") for cfg in (kvsmooth, scr, prunehal, farsight)),
    ):
        with pytest.raises(SpecError, match=needle) as err:
            check_inputs(cfg, [image], 30, settings)
        assert err.value.reason == "unsupported"


def test_a_server_default_the_parallel_layout_refuses_fails_at_startup():
    from transformers import AutoConfig

    from vllm_halluguard.server.mitigation import MitigationError, Policy, Resolver
    from vllm_halluguard.tiny_models import ensure_fixture

    hf_config = AutoConfig.from_pretrained(ensure_fixture("llava"))

    def layout(tp: int, pp: int) -> SimpleNamespace:
        return SimpleNamespace(  # an eager engine (scr's own setting check passes)
            parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
            compilation_config=SimpleNamespace(mode=0),
        )

    for default in ("kvsmooth", "prunehal", "scr", {"method": "farsight", "mode": "B"}):
        assert Resolver(Policy(default), hf_config, "auto", layout(2, 1)).default is not None
        with pytest.raises(MitigationError, match="pipeline_parallel_size=2"):
            Resolver(Policy(default), hf_config, "auto", layout(1, 2))
    assert Resolver(Policy(), hf_config, "auto", layout(1, 2)).default is None  # plain serving is fine


def test_mitigated_requests_are_refused_when_a_kv_connector_is_configured():
    """vLLM calls a KV connector's ``save_kv_layer`` with the layer's attention metadata, which on a
    mitigated step is the plugin's plan: a real config with a connector refuses every method at admission
    and a server default at startup; without one, the same config admits them."""
    from transformers import AutoConfig
    from vllm.config import KVTransferConfig

    from vllm_halluguard.engine.requests import check_inputs
    from vllm_halluguard.methods import SCRConfig, SpecError
    from vllm_halluguard.server.mitigation import MitigationError, Policy, Resolver
    from vllm_halluguard.tiny_models import ensure_fixture

    transfer = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with_connector, without = VllmConfig(kv_transfer_config=transfer), VllmConfig()
    image = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=2, length=16))
    methods = (
        KVSmoothConfig(lam_ref=0.5, layers=(1,)),
        PruneHalConfig(r=0.5, t=2, layers=(1,)),
        FarSightConfig(mode="B"),
        SCRConfig(top_k=2, lam=1.1, layers=(0,), diag_layers=(1,)),
    )
    for cfg in methods:
        if cfg.name != "scr":  # SCR also needs --enforce-eager (unset here); the connector is refused first
            check_inputs(cfg, [image], 30, without)
        with pytest.raises(SpecError, match="KV connector \\(ExampleConnector\\)") as err:
            check_inputs(cfg, [image], 30, with_connector)
        assert err.value.reason == "unsupported"
    hf_config = AutoConfig.from_pretrained(ensure_fixture("llava"))
    with pytest.raises(MitigationError, match="KV connector"):
        Resolver(Policy("kvsmooth"), hf_config, "auto", with_connector)
    assert Resolver(Policy(), hf_config, "auto", with_connector).default is None  # plain serving is fine


def test_the_wrapped_builder_keeps_plain_steps_native_and_builds_plans_self_contained():
    """Plain steps: vLLM's build, as called. Mitigated steps: every metadata of the plan is built with
    ``fast_build`` (FlashAttention 3 otherwise shares one persistent schedule buffer between builds)."""
    from vllm_halluguard.engine.plan import BuilderMixin, StepPlan

    calls: list[tuple[list[int], bool]] = []

    class Native:
        def build(
            self, prefix: int, cm: CommonAttentionMetadata, fast_build: bool = False
        ) -> SimpleNamespace:
            calls.append((cm.seq_lens.tolist(), fast_build))
            return SimpleNamespace(seq_lens=cm.seq_lens.tolist())

    builder = type("Wrapped", (BuilderMixin, Native), {"_hg_native_sinks": True})
    b = object.__new__(builder)
    b._hg_decoder, b._hg_kernel, b._hg_num_heads = True, False, HEADS
    view = _rows()
    runtime = SimpleNamespace(step=view, num_layers=LAYERS, stats={"farsight_native_rows": 0})
    runtime.view_for = lambda n: view if n == len(ROWS) else None
    try:
        state.set_current(None)  # no mitigated request yet
        assert isinstance(b.build(0, _common()), SimpleNamespace) and calls == [([s for _, s in ROWS], False)]
        calls.clear()
        state.set_current(runtime)
        plan = b.build(0, _common(), fast_build=False)
        assert isinstance(plan, StepPlan) and len(calls) >= 2 and all(fast for _, fast in calls)
    finally:
        state.set_current(None)
