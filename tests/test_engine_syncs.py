"""Host syncs on the kernel path (:mod:`helpers.sync_sentinel`): none inside a layer call, a few per step.

The engine is the session's shared LLaVA engine with its metadata builders switched to the kernel path
for this module (``_hg_kernel``, what ``HALLUGUARD_ATTENTION=triton`` sets when the builder is made; the
Triton kernel runs under the interpreter), so no engine is started here. Per method, one batch of a
plain row and a mitigated row runs with the sentinel on: its events per layer call and per step are
printed (``-s``), the layer calls must have none, and the outputs must equal the same batch's on the
torch path (which the contract and composition suites hold to the dense reference). PruneHal's
decisions are read by the host after the forward (``read`` scope): only their host buffers, nothing of
the device state. One mixed batch holds every method and composition at once.
Untested on a GPU: the sentinel counts what would wait for the stream there.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers.device_sim import on_device, simulated_device
from helpers.sync_sentinel import STEP_BOUND, Event, SyncSentinel
from vllm_halluguard.engine.cache_io import SplitViews
from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY
from vllm_halluguard.engine.kvsmooth import Buffers, KVSmoothEngine
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.plan import device_rows
from vllm_halluguard.engine.runtime import worker_stats
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig
from vllm_halluguard.parity import Case, compare, run_vllm

FARSIGHT_B = {"method": "farsight", "mode": "B"}
FARSIGHT_C = {"method": "farsight", "mode": "C"}
#: Methods whose layer calls must not sync, and the batches that measure them.
ASSERTED: dict[str, Any] = {
    "kvsmooth": "kvsmooth",
    "farsight-B": FARSIGHT_B,
    "farsight-C": FARSIGHT_C,
    "farsight-B+kvsmooth": [FARSIGHT_B, "kvsmooth"],
    "farsight-C+kvsmooth": [FARSIGHT_C, "kvsmooth"],
    "prunehal": "prunehal",
    "farsight-B+prunehal": [FARSIGHT_B, "prunehal"],
    "farsight-C+prunehal": ["prunehal", FARSIGHT_C],
    "kvsmooth+prunehal": ["kvsmooth", "prunehal"],
    "farsight-B+kvsmooth+prunehal": [FARSIGHT_B, "kvsmooth", "prunehal"],
    "scr": "scr",
    "scr+farsight-C": ["scr", FARSIGHT_C],
}
#: Methods none of whose rows the Triton kernel computes here: FarSight B runs as the native kernel's
#: sink lane on CPU_ATTN; SCR's diagnostic rows are observed (their map), its real rows plain attention.
NO_KERNEL_ROWS = {"farsight-B", "scr"}
#: Specs whose requests decide (PruneHal): the host must have read their decisions.
DECIDING = {name for name in ASSERTED if "prunehal" in name}
MAX_TOKENS = 4


# ------------------------------------------------------------------------- the sentinel itself


def test_sentinel_counts_each_kind_in_its_scope_only():
    s = SyncSentinel()
    x = torch.arange(6.0)
    x.tolist()  # outside any scope: not counted
    with s.scope("layer"):
        x.tolist()
        x[0].item()
        bool(x[1])
        x.cpu()
        x.to("cpu", non_blocking=True)
        x.to(torch.int32)  # a dtype change: no transfer
        x[x > 2]
        torch.nonzero(x)
        torch.masked_select(x, x > 1)
        x[torch.arange(2)]  # an index tensor made on the device: no sync
        torch.tensor([1, 2])
        torch.where(x > 1, x, 0.0)  # no data-dependent size
        with s.paused():
            x.cpu()
    with s.scope("step"):
        x[[0, 1]]  # a Python list index: a host-to-device copy
    kinds = [e.kind for e in s.events if e.scope == "layer"]
    assert kinds == [
        "tolist", "item", "__bool__", "cpu", "to(device)", "boolean-mask index", "nonzero", "masked_select",
        "tensor",
    ]  # fmt: skip
    assert [e.non_blocking for e in s.events if e.kind == "to(device)"] == [True]
    assert s.counts("step") and s.total("step") == 1
    assert all(e.where.startswith(__file__.rsplit("/", 1)[1]) or __file__ in e.where for e in s.events)


# ------------------------------------------------------------------------------- the engine


def _builders(worker: Any) -> list[Any]:
    return [b for groups in worker.model_runner.attn_groups for g in groups for b in g.metadata_builders]


def _set_kernel(worker: Any, on: bool) -> list[bool]:
    """``collective_rpc`` helper: switch the plugin's builders to the kernel path (or back)."""
    builders = [b for b in _builders(worker) if hasattr(b, "_hg_kernel")]
    before = [b._hg_kernel for b in builders]
    for b in builders:
        b._hg_kernel = on
    return before


@pytest.fixture(scope="module")
def kernel_engine(engines):
    llm = engines.get("llava")
    (before,) = llm.collective_rpc(_set_kernel, args=(True,))
    assert before and not any(before), "the shared engine runs the torch path"
    yield llm
    llm.collective_rpc(_set_kernel, args=(False,))


def _cases(*specs: Any) -> list[Case]:
    """A plain row, then one row per spec."""
    return [Case("llava", 90 + i, max_tokens=MAX_TOKENS, extra_args=e) for i, e in
            enumerate([None, *({EXTRA_ARGS_KEY: spec} for spec in specs)])]  # fmt: skip


def _run(llm: Any, *specs: Any) -> SyncSentinel:
    """One batch of a plain row and a row per spec, with the sentinel on (``s.gens``: their outputs)."""
    s = SyncSentinel()
    (before,) = llm.collective_rpc(worker_stats)
    with s.engine():
        s.gens = run_vllm(llm, _cases(*specs))  # type: ignore[attr-defined]
    (after,) = llm.collective_rpc(worker_stats)
    s.kernel_rows = after["kernel_rows"] - before["kernel_rows"]  # type: ignore[attr-defined]
    return s


def _report(name: str, s: SyncSentinel) -> str:
    per_layer = s.total("layer") / max(s.layer_calls, 1)
    per_step = s.total("step") / max(s.steps, 1)
    lines = [
        f"{name}: {s.layer_calls} layer calls, {s.total('layer')} syncs ({per_layer:.2f} per call); "
        f"{s.steps} steps, {s.total('step')} syncs ({per_step:.2f} per step, at most "
        f"{s.most_in_one_step()}); "
        f"{s.reads} decision reads, {s.total('read')} syncs; kernel rows {getattr(s, 'kernel_rows', '?')}"
    ]
    for scope in ("layer", "step", "read"):
        lines += [f"    {scope} {where}: {n}" for where, n in sorted(s.counts(scope).items())]
    return "\n".join(lines)


def _check(llm: Any, name: str, specs: list[Any], s: SyncSentinel, step_bound: int, deciding: bool) -> None:
    print(_report(name, s))
    assert s.layer_calls > 0 and s.steps > 0, "the mitigated steps must have run through the plugin"
    assert s.total("layer") == 0, _report(name, s)
    assert s.most_in_one_step() <= step_bound, _report(name, s)
    assert not s.blocking_copies("step"), _report(name, s)
    if deciding:  # every step's decisions were read by the host, from their host buffers only
        assert s.reads >= MAX_TOKENS and s.total("read") == 0, _report(name, s)
    # the same batch on the torch path (= the dense reference: test_engine_contract / _compose)
    llm.collective_rpc(_set_kernel, args=(False,))
    try:
        torch_gens = run_vllm(llm, _cases(*specs))
    finally:
        llm.collective_rpc(_set_kernel, args=(True,))
    for got, want in zip(s.gens, torch_gens, strict=True):
        report = compare(got, want)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-3, f"{name}: {report}"


@pytest.mark.engine
@pytest.mark.parametrize("name", list(ASSERTED))
def test_no_sync_in_a_layer_call(kernel_engine, name):
    s = _run(kernel_engine, ASSERTED[name])
    if name not in NO_KERNEL_ROWS:
        assert s.kernel_rows > 0, "the Triton kernel must have computed the mitigated rows"
    _check(kernel_engine, name, [ASSERTED[name]], s, STEP_BOUND, name in DECIDING)


@pytest.mark.engine
def test_no_sync_in_a_mixed_batch(kernel_engine):
    """Every method and composition above in one batch with a plain row: the same bounds per step (the
    plan is built once per step, whatever its rows)."""
    specs = list(ASSERTED.values())
    s = _run(kernel_engine, *specs)
    assert s.kernel_rows > 0
    _check(kernel_engine, "mixed", specs, s, STEP_BOUND, deciding=True)


@pytest.mark.engine
def test_a_deliberate_cpu_copy_is_caught(kernel_engine, monkeypatch):
    from vllm_halluguard.engine.kvsmooth import KVSmoothEngine

    original = KVSmoothEngine.after_kernel

    def after_kernel(self, call, rows, lse, entropy):
        lse.cpu()  # the regression: a device-to-host copy in every smoothed layer
        return original(self, call, rows, lse, entropy)

    monkeypatch.setattr(KVSmoothEngine, "after_kernel", after_kernel)
    s = _run(kernel_engine, "kvsmooth")
    added = [
        e
        for e in s.events
        if e.scope == "layer" and e.kind == "cpu" and e.where.startswith("engine/execute.py")
    ]
    assert len(added) == s.kernel_rows > 0, _report("kvsmooth+cpu", s)  # one per smoothed layer call


@pytest.mark.engine
def test_a_deliberate_read_back_in_prunehal_is_caught(kernel_engine, monkeypatch):
    """Regressions in PruneHal's layer path (its statistics read back before the decision) and in its
    decision read (the device masks read instead of the decision's host copy)."""
    from vllm_halluguard.engine import prunehal

    store, measure, record = prunehal._store, prunehal.measure, prunehal._record

    def _store(call, todo, head_avg, keep):  # the torch path (the prompt's last token)
        head_avg.cpu()  # the regression: a device-to-host copy in every measured layer call
        return store(call, todo, head_avg, keep)

    def _measure(call, g, lse):  # the kernel path (decode rows: one config group here)
        lse.cpu()  # the same regression
        return measure(call, g, lse)

    def _record(runtime, st, d):
        st.keep.tolist()  # the regression: the host reads the device masks
        return record(runtime, st, d)

    monkeypatch.setattr(prunehal, "_store", _store)
    monkeypatch.setattr(prunehal, "measure", _measure)
    monkeypatch.setattr(prunehal, "_record", _record)
    s = _run(kernel_engine, "prunehal")
    added = [e for e in s.events if e.scope == "layer" and e.kind == "cpu" and "prunehal.py" in e.where]
    assert len(added) == s.layer_calls > 0, _report("prunehal+cpu", s)  # one per measured layer call
    reads = [e for e in s.events if e.scope == "read" and e.kind == "tolist"]
    assert len(reads) >= MAX_TOKENS, _report("prunehal+cpu", s)  # one per decision read


# ------------------------------------------------- KVSmooth's kernel path on a simulated device


def _kvsmooth_layer(with_plan: bool) -> tuple[list, list[Event], torch.Tensor, torch.Tensor, torch.Tensor]:
    """KVSmooth's ``after_kernel`` over three decode rows (two configs, two rows at their first generated
    token) on the simulated device, FLASH_ATTN's cache views; with the step's tables (made from its
    device tables outside the layer call, as the builder does) or the per-row path. Returns the host
    transfers, the counted syncs, the caches and the FIFOs after."""
    g = torch.Generator().manual_seed(3)
    nb, bs, hkv, hq, d = 8, 16, 2, 4, 8
    k_cache, v_cache = torch.randn(2, nb, bs, hkv, d, generator=g).unbind(0)
    block_table = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 7]])
    seq_lens, prompt_lens = [21, 9, 40], [20, 8, 30]
    slots = torch.tensor([block_table[i, (s - 1) // bs] * bs + (s - 1) % bs for i, s in enumerate(seq_lens)])
    first = KVSmoothConfig(lam_ref=0.5, window=4, layers=(0,), smooth_first_token=False)
    other = KVSmoothConfig(lam_ref=0.7, window=15, layers=(0,))
    rows = [Row(i, RequestState(f"r{i}", 3 - i, cfg, p)) for i, (cfg, p) in
            enumerate(zip((first, other, first), prompt_lens, strict=True))]  # fmt: skip
    entropy = torch.rand(3, hq, generator=g) * 3
    runtime = SimpleNamespace(capacity=4, num_layers=1, ext={})
    KVSmoothEngine().setup(runtime)
    runtime.ext["kvsmooth"].queue[:, 0, :3] = torch.rand(4, 3, generator=g)  # some history
    runtime.ext["kvsmooth"].count[:, 0] = 3
    sentinel = SyncSentinel()
    with simulated_device() as transfers:
        io = SplitViews(on_device(k_cache), on_device(v_cache), on_device(block_table))
        plan = None
        if with_plan:  # the FIFOs where KVSmooth.setup makes them on a GPU
            buf = runtime.ext["kvsmooth"]
            runtime.ext["kvsmooth"] = Buffers(on_device(buf.queue), on_device(buf.count))
            cm = SimpleNamespace(
                num_reqs=3,
                query_start_loc=on_device(torch.arange(4, dtype=torch.int32)),
                seq_lens=on_device(torch.tensor(seq_lens, dtype=torch.int32)),
            )
            plan = SimpleNamespace(
                rows=device_rows(cm, StepView(3, tuple(rows))), query_start_loc=[0, 1, 2, 3],
                seq_lens=seq_lens, block_table=on_device(block_table), block_size=bs,
                slot_mapping=on_device(slots), prepared={},
            )  # fmt: skip
            KVSmoothEngine().prepare_step(plan, rows, kernel=True)  # the builder's part, once per step
        query = on_device(torch.zeros(3, hq, d))
        call = LayerCall(
            layer=0, scale=d**-0.5, query=query, output=query.clone(), query_start_loc=[0, 1, 2, 3],
            seq_lens=seq_lens, slot_mapping=on_device(slots), runtime=runtime, gather=io.gather,
            write=io.write, gather_batch=io.gather_batch, gather_slots=io.gather_slots, plan=plan,
            io=io if with_plan else None,
        )  # fmt: skip
        with sentinel.scope("layer"):
            KVSmoothEngine().after_kernel(call, rows, on_device(torch.zeros(3, hq)), on_device(entropy))
        queue = runtime.ext["kvsmooth"].queue.cpu()
        count = runtime.ext["kvsmooth"].count.cpu()
    return list(transfers), sentinel.events, k_cache, v_cache, torch.cat([queue[:, 0], count[:, :1]], 1)


def test_kvsmooth_kernel_path_stays_on_the_device_and_equals_the_row_path():
    transfers, events, k, v, fifo = _kvsmooth_layer(with_plan=True)
    assert [what for what, _ in transfers] == ["cpu", "cpu"], transfers  # the test's reads of the FIFOs
    assert events == [], events
    _, old_events, k0, v0, fifo0 = _kvsmooth_layer(with_plan=False)
    assert old_events, "the per-row path reads host data (the sentinel must see it)"
    torch.testing.assert_close(fifo, fifo0)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    k_raw, _ = torch.randn(2, 8, 16, 2, 8, generator=torch.Generator().manual_seed(3)).unbind(0)
    assert not torch.equal(k, k_raw), "some row must have been smoothed"


def test_a_step_sends_its_host_tables_in_one_non_blocking_copy():
    """:class:`~vllm_halluguard.engine.plan.Upload`: parts of several dtypes and shapes (the request
    tables, sinks, a key mask) reach the simulated device in one non-blocking copy, each equal to its
    host tensor in dtype, shape and value."""
    from helpers.device_sim import SIM_DEVICE
    from vllm_halluguard.engine.plan import Upload

    g = torch.Generator().manual_seed(0)
    parts = [
        torch.tensor([[3, -1, 5], [20, -1, 9]]),
        torch.randn(3, 4, generator=g),
        torch.tensor([[True, False, True], [False, False, True]]),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(1, 7, generator=g).expand(2, 7),  # not contiguous
    ]
    s = SyncSentinel()
    with simulated_device():
        upload = Upload()
        index = [upload.add(p) for p in parts]
        with s.scope("step"):
            sent = upload.send(SIM_DEVICE)
        got = [(sent[i].device, sent[i].cpu()) for i in index]
    for (device, x), want in zip(got, parts, strict=True):
        assert device == SIM_DEVICE
        assert x.dtype == want.dtype and x.shape == want.shape and torch.equal(x, want)
    moves = [e for e in s.events if e.kind == "to(device)"]
    assert len(moves) == 1 and moves[0].non_blocking, s.events
    assert not s.blocking_copies("step")
