"""PruneHal's per-step tables: a layer call on the kernel path is a fixed op sequence over its rows.

No engine: the kernel lane of a layer (:func:`vllm_halluguard.engine.execute._kernel_lane`) is driven
directly on CPU tensors with FLASH_ATTN's cache views, the step's tables made beforehand as the builder
does (``_prepare``), and the Triton launch replaced by a stub that records the key mask it is handed and
returns each row's LSE over its kept keys (computed here, row by row).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_halluguard.engine import execute, tp
from vllm_halluguard.engine import plan as plan_mod
from vllm_halluguard.engine.cache_io import SplitViews
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.plan import LayerPlan, StepPlan, SubBatch, device_rows
from vllm_halluguard.engine.prunehal import PruneState
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.kernels import triton_attention
from vllm_halluguard.kernels.reference import attention_logits
from vllm_halluguard.methods.prunehal import PruneHalConfig

HQ, HKV, D, BS = 4, 2, 8, 8
LAYERS = (0, 1)
VISUAL = torch.arange(2, 18)
CONFIGS = (
    PruneHalConfig(r=0.5, t=3, layers=LAYERS),
    PruneHalConfig(r=0.5, t=3, layers=LAYERS, statistic="mass"),
)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _world(n: int, configs=CONFIGS):
    """``n`` decode rows at their step 4 (``configs`` in turn; every other row with keys pruned earlier),
    their paged cache, queries and per-row key masks."""
    g = torch.Generator().manual_seed(n)
    prompts = [24 + (5 * i) % 17 for i in range(n)]
    seq_lens = [p + 3 for p in prompts]
    blocks = -(-(max(seq_lens) + 1) // BS)  # room for a second step
    k_cache = torch.randn(n * blocks + 1, BS, HKV, D, generator=g)
    v_cache = torch.randn_like(k_cache)
    table = (torch.arange(n * blocks) + 1).view(blocks, n).T.contiguous().int()  # interleaved blocks
    rows, masks = [], []
    cycle = [configs[i % len(configs)] for i in range(n)]
    for i, (cfg, prompt) in enumerate(zip(cycle, prompts, strict=True)):
        state = RequestState(f"r{i}", i, cfg, prompt)
        record = {"prompt_len": prompt, "steps": 3, "prunes": [], "reclaimable_blocks": 0}
        st = PruneState.fresh(VISUAL.clone(), LAYERS, record)
        high = 5.0 if i % 4 < 2 else 0.05  # a high history on half the rows: their vote fires
        st.hist_sum = torch.rand(1, len(LAYERS), generator=g) * high
        st.hist_n = torch.ones(1, dtype=torch.long)
        st.count = torch.ones(1, dtype=torch.long)
        if i % 2:  # pruned before: the host read that decision
            st.keep = torch.rand(len(LAYERS), VISUAL.numel(), generator=g) < 0.6
            st.host_keep, st.host_kept = st.keep.clone(), [False] * len(LAYERS)
            st.pruned_layers = frozenset(LAYERS)
        state.scratch["prunehal"] = st
        rows.append(Row(i, state))
        layer_masks = torch.ones(len(LAYERS), seq_lens[i], dtype=torch.bool)
        layer_masks[:, VISUAL] = st.keep
        masks.append(layer_masks)
    q = torch.randn(len(LAYERS), n, HQ, D, generator=g)
    return rows, seq_lens, SplitViews(k_cache, v_cache, table), q, masks


def _step(n: int, monkeypatch):
    """One decode step of ``n`` rows through both layers' kernel lanes (:func:`_run_step`)."""
    rows, seq_lens, io, q, masks = _world(n)
    return _run_step(rows, seq_lens, io, q, masks, monkeypatch)


def _statistics(row, logits, mask):
    """The expected ``(A, scores)`` of a row from its masked logits ``[1, Hq, S]`` and key mask ``[S]``,
    row by row: the head-mean probabilities on the visual keys, their mean (or mass) over the kept ones."""
    probs = torch.softmax(logits, -1)[0][:, VISUAL].mean(0)  # head mean on the visual keys
    keep = mask[VISUAL]
    total = probs[keep].sum()
    return (total / keep.sum() if row.request.config.statistic == "mean" else total), probs


def _run_step(rows, seq_lens, io, q, masks, monkeypatch):
    """One decode step through both layers' kernel lanes. Returns the ops of each layer call, the key
    masks the kernel got, the rows, the expected (A, scores) per row and the masks."""
    n = len(rows)
    table = io.block_table
    qsl = list(range(n + 1))
    view = StepView(n, tuple(rows))
    cm = SimpleNamespace(
        num_reqs=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )  # fmt: skip
    kernel = SubBatch(
        list(range(n)), slice(0, n), n, query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens,
        block_table=table,
    )  # fmt: skip
    lp = LayerPlan(SubBatch([], slice(0, 0), 0), tuple(rows), kernel=kernel, lane=(("prunehal", rows),))
    lp.width = max(seq_lens)
    plan = StepPlan(view, qsl, seq_lens, n, LayerPlan(None), layers={layer: lp for layer in LAYERS})
    plan.rows, plan.block_table, plan.block_size = device_rows(cm, view), table, BS
    plan.slot_mapping = torch.tensor(seq_lens) - 1
    plan.kernel_args = {layer: (None, None) for layer in LAYERS}
    plan.masks_per_layer = frozenset(LAYERS)
    plan_mod._prepare(plan)  # the builder's part, once per step
    runtime = SimpleNamespace(block_size=BS, num_layers=len(LAYERS), stats={"kernel_rows": 0}, ext={})
    scale = D**-0.5
    lses, want = [], []
    for j in range(len(LAYERS)):  # each row's LSE over its kept keys, and its statistics, row by row
        lse, stats = [], []
        for r, row in enumerate(rows):
            k, _ = io.gather(r, seq_lens[r])
            pos = torch.tensor([seq_lens[r] - 1])
            logits = attention_logits(q[j, r : r + 1], k, scale, pos, masks[r][j])
            lse.append(torch.logsumexp(logits, -1))
            stats.append(_statistics(row, logits, masks[r][j]))
        lses.append(torch.cat(lse))
        want.append(stats)
    seen: list[torch.Tensor | None] = []
    current = {"layer": 0}

    def stub(out, lse, entropy, *args, key_mask=None, **kwargs):
        seen.append(None if key_mask is None else key_mask.clone())
        lse.copy_(lses[current["layer"]])

    monkeypatch.setattr(triton_attention, "paged_attention_into", stub)
    impl = SimpleNamespace(sinks=None, scale=scale)
    ops = []
    for j, layer in enumerate(LAYERS):
        current["layer"] = j
        call = LayerCall.reading(
            io, layer=layer, scale=scale, query=q[j].clone(), output=torch.zeros(n, HQ, D), runtime=runtime,
            query_start_loc=qsl, seq_lens=seq_lens, slot_mapping=plan.slot_mapping, plan=plan,
        )  # fmt: skip
        counter = _Ops()
        with counter:
            execute._kernel_lane(impl, call, lp, kernel, io)
        ops.append(counter.ops)
    return ops, seen, rows, want, masks, seq_lens


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch):
    monkeypatch.setattr(tp, "tp_group", lambda: tp._SINGLE)


def test_a_kernel_path_layer_call_is_a_fixed_op_sequence_over_its_rows(monkeypatch):
    results = {n: _step(n, monkeypatch) for n in (4, 24)}
    for n, (_, seen, rows, want, masks, seq_lens) in results.items():
        for j in range(len(LAYERS)):  # the kernel got every row's key mask
            mask = seen[j]
            assert mask is not None and mask.shape == (n, max(seq_lens))
            for r in range(n):
                assert torch.equal(mask[r, : seq_lens[r]], masks[r][j]), (n, j, r)
                assert mask[r, seq_lens[r] :].all()
        for r, row in enumerate(rows):  # the decision after layer 1, from this step's statistics
            st = row.request.scratch["prunehal"]
            assert [d.step for d in st.pending] == [4]
            torch.testing.assert_close(st.A, torch.stack([want[j][r][0] for j in range(len(LAYERS))]))
            torch.testing.assert_close(st.scores, torch.stack([want[j][r][1] for j in range(len(LAYERS))]))
    (few, *_), (many, *_) = results[4], results[24]
    assert few == many, f"ops per layer call (measuring, deciding): {few} at 4 rows, {many} at 24 rows"


def _next_step(rows, seq_lens, q):
    """The next step's sequence lengths, queries and key masks (the decisions' host copies)."""
    seq_lens = [s + 1 for s in seq_lens]
    masks = []
    for r, row in enumerate(rows):
        d = row.request.scratch["prunehal"].pending[-1]
        layer_masks = torch.ones(len(LAYERS), seq_lens[r], dtype=torch.bool)
        layer_masks[:, VISUAL] = d.keep[d.row]
        masks.append(layer_masks)
    return seq_lens, q.flip(1).contiguous(), masks


def _two_steps(n: int, settle: bool, monkeypatch):
    """Two decode steps; the second reads the first's decision as one stack (the requests decided
    together), or, with ``settle``, each request's own rows of it first (the per-row stacking)."""
    rows, seq_lens, io, q, masks = _world(n)
    ops1, *_ = _run_step(rows, seq_lens, io, q, masks, monkeypatch)
    seq_lens, q, masks = _next_step(rows, seq_lens, q)
    fired = [bool(d.fired[d.row]) for d in (row.request.scratch["prunehal"].pending[-1] for row in rows)]
    assert any(fired) and not all(fired), "some requests prune at step 4, some do not"
    if settle:
        for row in rows:
            row.request.scratch["prunehal"].settle()
    ops2, seen, _, want, _, _ = _run_step(rows, seq_lens, io, q, masks, monkeypatch)
    state = []
    for r, row in enumerate(rows):
        st = row.request.scratch["prunehal"]
        d = st.pending[-1]
        assert torch.equal(seen[0][r, : seq_lens[r]], masks[r][0]), "the first decision's masks apply"
        state.append((d.step, bool(d.fired[d.row]), d.keep[d.row], st.keep, st.count, st.hist_sum, st.hist_n))
        torch.testing.assert_close(st.A, torch.stack([want[j][r][0] for j in range(len(LAYERS))]))
    return ops1, ops2, state


def test_a_decision_read_as_one_stack_equals_the_per_row_state(monkeypatch):
    _, _, stacked = _two_steps(6, False, monkeypatch)
    _, _, per_row = _two_steps(6, True, monkeypatch)
    assert [x[0] for x in stacked] == [5] * 6
    for a, b in zip(stacked, per_row, strict=True):
        assert a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:], strict=True))


def _torch_layer(n: int):
    """Layer 0 (not the deciding one) of a decode step of ``n`` rows of two configs on the CPU engine's
    torch path (:func:`_torch_step`): the ops of the layer call, the output it leaves, the rows' masked
    attention (the reference's), that output before the call, the rows and the expected (A, scores)."""
    ops, outputs, wants, natives, rows, stats, _ = _torch_step(n, CONFIGS, layers=1)
    return ops[0], outputs[0], wants[0], natives[0], rows, stats[0]


def test_a_torch_path_layer_call_is_a_fixed_op_sequence_over_its_rows():
    """On the CPU engine's torch path a layer call computes the rows with pruned keys as the reference's
    masked softmax, leaves the others' native output bit for bit, measures the statistics over the kept
    keys, and does so in a fixed op sequence whatever the row count (the step's tables are made once:
    pages, last tokens, visual positions, keep masks stacked)."""
    results = {n: _torch_layer(n) for n in (4, 24)}
    for n, (_, output, want, native, rows, stats) in results.items():
        for r, row in enumerate(rows):
            st = row.request.scratch["prunehal"]
            if r % 2:  # pruned before
                torch.testing.assert_close(output[r], want[r], atol=1e-5, rtol=1e-4)
                assert not torch.equal(output[r], native[r])
            else:
                assert torch.equal(output[r], native[r]), (n, r)
            a, scores, b = st.parts[0]
            torch.testing.assert_close(a[b], stats[r][0])
            torch.testing.assert_close(scores[b, : VISUAL.numel()], stats[r][1])
    assert results[4][0] == results[24][0], (results[4][0], results[24][0])


def _torch_step(n: int, configs: tuple[PruneHalConfig, ...], layers: int = len(LAYERS)):
    """The first ``layers`` layers of a decode step of ``n`` rows (``configs`` in turn) on the CPU
    engine's torch path, each layer's output holding the rows' unmasked attention before the call (where
    a row prunes, the layer call must replace it). Returns per layer the ops of its call, the output it
    leaves, the rows' masked attention (the reference's) and that output before the call; the rows; their
    expected statistics per layer; and their state before the step."""
    from vllm_halluguard.engine.prunehal import PruneHalEngine, on_device
    from vllm_halluguard.kernels.reference import attention_rows

    rows, seq_lens, io, q, masks = _world(n, configs)
    scale, qsl = D**-0.5, list(range(n + 1))
    plan = SimpleNamespace(
        query_start_loc=qsl, seq_lens=seq_lens, block_table=io.block_table, block_size=BS,
        slot_mapping=torch.tensor(seq_lens) - 1, prepared={},
    )  # fmt: skip
    runtime = SimpleNamespace(block_size=BS, num_layers=len(LAYERS), stats={}, ext={})
    before = []
    for row in rows:
        st = row.request.scratch["prunehal"]
        on_device(st, row.request.config, q.device)
        before.append((st.keep.clone(), st.count.clone(), st.hist_sum.clone(), st.hist_n.clone()))
    ops, outputs, wants, natives, stats = [], [], [], [], []
    for j, layer in enumerate(LAYERS[:layers]):
        native, want, layer_stats = torch.zeros(n, HQ, D), torch.zeros(n, HQ, D), []
        for r, row in enumerate(rows):
            k, v = io.gather(r, seq_lens[r])
            pos = torch.tensor([seq_lens[r] - 1])
            native[r] = attention_rows(q[j, r : r + 1], k, v, scale, pos)[0][0]
            want[r] = attention_rows(q[j, r : r + 1], k, v, scale, pos, key_mask=masks[r][j])[0][0]
            logits = attention_logits(q[j, r : r + 1], k, scale, pos, masks[r][j])
            layer_stats.append(_statistics(row, logits, masks[r][j]))
        output = native.clone()
        call = LayerCall.reading(
            io, layer=layer, scale=scale, query=q[j].clone(), output=output, query_start_loc=qsl,
            seq_lens=seq_lens, slot_mapping=plan.slot_mapping, runtime=runtime, plan=plan,
        )  # fmt: skip
        counter = _Ops()
        with counter:
            PruneHalEngine().run(call, rows)
        ops.append(counter.ops)
        outputs.append(output)
        wants.append(want)
        natives.append(native)
        stats.append(layer_stats)
    return ops, outputs, wants, natives, rows, stats, before


@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "torch-ops"])
@pytest.mark.parametrize("cfg", (*CONFIGS, PruneHalConfig(r=0.5, t=3, layers=LAYERS, granularity="block")))
def test_a_torch_path_step_of_one_config_is_one_group(cfg, native, monkeypatch):
    """Rows sharing a config, layers and visual tokens run the torch path as one group, by the native CPU
    kernel (one call per layer) or by torch ops: every layer call a fixed op sequence whatever the row
    count, pruned rows as the reference's masked softmax, the others' native output bit for bit, and one
    decision after the last layer equal to the methods' math on each row's own statistics and state."""
    from vllm_halluguard.kernels import cpu_native
    from vllm_halluguard.methods.prunehal import prune_step, visual_groups

    monkeypatch.setenv(cpu_native.NATIVE_ENV, "1" if native else "0")
    calls = []
    real = cpu_native.prunehal_layer
    monkeypatch.setattr(cpu_native, "prunehal_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {n: _torch_step(n, (cfg,)) for n in (4, 24)}
    assert len(calls) == (2 * len(LAYERS) if native else 0)
    assert results[4][0] == results[24][0], (results[4][0], results[24][0])
    for n, (_, outputs, wants, natives, rows, stats, before) in results.items():
        for j in range(len(LAYERS)):
            for r in range(len(rows)):
                if r % 2:  # pruned before
                    torch.testing.assert_close(outputs[j][r], wants[j][r], atol=1e-5, rtol=1e-4)
                    assert not torch.equal(outputs[j][r], natives[j][r])
                else:
                    assert torch.equal(outputs[j][r], natives[j][r]), (n, j, r)
        fired_rows = 0
        for r, row in enumerate(rows):
            st = row.request.scratch["prunehal"]
            keep0, count0, hist_sum0, hist_n0 = before[r]
            A = torch.stack([stats[j][r][0] for j in range(len(LAYERS))])[None]
            scores = torch.stack([stats[j][r][1] for j in range(len(LAYERS))])[None]
            groups = visual_groups(VISUAL, cfg.block)[None] if cfg.granularity == "block" else None
            fired, keep, count, hist_sum, hist_n = prune_step(
                torch.tensor([4]), cfg, keep0[None], count0, A, scores, hist_sum0, hist_n0, groups
            )
            d = st.pending[-1]
            assert d.step == 4 and bool(d.fired[d.row]) == bool(fired[0])
            fired_rows += bool(fired[0])
            torch.testing.assert_close(st.A, A[0])
            torch.testing.assert_close(st.scores, scores[0])
            assert torch.equal(st.keep, keep[0]) and torch.equal(d.keep[d.row], keep[0]), (n, r)
            assert torch.equal(st.count, count) and torch.equal(st.hist_n, hist_n)
            torch.testing.assert_close(st.hist_sum, hist_sum)
        assert 0 < fired_rows < len(rows)  # the world has rows whose vote fires and rows whose does not
