"""KVSmooth's per-step tables: a smoothed layer call is a fixed op sequence over all its rows.

No engine: the layer call is driven directly, on CPU tensors, with FLASH_ATTN's cache views
(:class:`~vllm_halluguard.engine.cache_io.SplitViews`) and vLLM's packed CPU pages.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_halluguard.engine.cache_io import CPUPages, SplitViews
from vllm_halluguard.engine.cpu_cache import page_ids, write_kv
from vllm_halluguard.engine.kvsmooth import Buffers, KVSmoothEngine, push_rank
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.plan import device_rows
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, ema, row_entropy, update_lambda


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("divisor", ["window", "filled"])
def test_push_rank_equals_update_lambda(inclusive, divisor):
    g = torch.Generator().manual_seed(1)
    m = 5
    cfg = KVSmoothConfig(lam_ref=0.6, clip=0.3, window=m, rank_inclusive=inclusive, rank_divisor=divisor)
    count = torch.tensor([0, 1, 4, 5, 8, 25, 3])  # empty, filling, full, wrapped
    queue = torch.randint(0, 4, (7, m), generator=g).float()  # small integers: ties with z
    z = torch.tensor([1.0, 2.0, 0.0, 3.0, 2.0, 1.5, 9.0])
    want = update_lambda(queue, count, z, cfg)
    got = push_rank(queue, count, z, cfg, torch.arange(m))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _packed_cache(dtype=torch.float32):
    """vLLM's packed CPU pages with known K/V written through vLLM's op; returns (io, k, v, table)."""
    nb, hkv, bs, hs = 6, 2, 16, 32
    g = torch.Generator().manual_seed(2)
    cache = torch.zeros(nb, hkv, bs, 2 * hs, dtype=dtype)
    table = torch.tensor([[4, 1, 3], [2, 5, 0]])
    k = torch.randn(2, 3 * bs, hkv, hs, generator=g).to(dtype)
    v = torch.randn(2, 3 * bs, hkv, hs, generator=g).to(dtype)
    pos = torch.arange(3 * bs)
    for r in range(2):
        write_kv(cache, k[r], v[r], table[r, pos // bs] * bs + pos % bs, "vec")
    return CPUPages(cache, table, "vec", "auto"), k, v, table, bs


@pytest.mark.parametrize("strided", [True, False])
def test_cpu_pages_read_at_precomputed_addresses(strided):
    io, k, v, table, bs = _packed_cache()
    if not strided:  # the page-gather path (packings without plain page halves)
        io._views, io._views_made = None, True
    positions = torch.tensor([[0, 17], [33, 40]])
    rows = torch.tensor([[0, 0], [1, 1]])
    got_k, got_v = io.read_at(table[rows, positions // bs], positions % bs)
    assert torch.equal(got_k, k[rows, positions]) and torch.equal(got_v, v[rows, positions])
    lens = torch.tensor([20, 41])
    ids, valid = page_ids(table, lens, 41, bs)
    keys = io.read_keys(ids, 41)
    assert keys.shape == (2, 41, 2, 32)
    for r in range(2):
        assert torch.equal(keys[r][valid[r]], k[r, : int(lens[r])])


def _layer_call(n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """KVSmooth's ``after_kernel`` over ``n`` decode rows (two configs, one skipping its first generated
    token) with the step's tables made beforehand, as the builder does. Returns the ops dispatched in
    the layer call, the K cache after and the expected K cache (the EMA computed here, row by row)."""
    g = torch.Generator().manual_seed(4)
    nb, bs, hkv, hq, d = 4 * n, 16, 2, 4, 8
    k_cache, v_cache = torch.randn(2, nb, bs, hkv, d, generator=g).unbind(0)
    table = torch.arange(nb).view(n, 4).flip(1).contiguous()
    seq_lens = [20 + (7 * i) % 40 for i in range(n)]  # 2 to 4 blocks each
    prompt_lens = [s - 1 if i % 3 == 0 else s - 5 for i, s in enumerate(seq_lens)]
    slots = torch.tensor([int(table[i, (s - 1) // bs]) * bs + (s - 1) % bs for i, s in enumerate(seq_lens)])
    cfgs = (
        KVSmoothConfig(lam_ref=0.5, window=4, layers=(0,), smooth_first_token=False),
        KVSmoothConfig(lam_ref=0.7, window=15, layers=(0,)),
    )
    rows = [Row(i, RequestState(f"r{i}", i, cfgs[i % 2], p)) for i, p in enumerate(prompt_lens)]
    runtime = SimpleNamespace(capacity=n, num_layers=1, ext={})
    KVSmoothEngine().setup(runtime)
    buf: Buffers = runtime.ext["kvsmooth"]
    buf.queue[:, 0, :3] = torch.rand(n, 3, generator=g)
    buf.count[:, 0] = 3
    queue0, count0 = buf.queue.clone(), buf.count.clone()
    entropy = torch.rand(n, hq, generator=g) * 3
    qsl = list(range(n + 1))
    cm = SimpleNamespace(
        num_reqs=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )  # fmt: skip
    plan = SimpleNamespace(
        rows=device_rows(cm, StepView(n, tuple(rows))), query_start_loc=qsl, seq_lens=seq_lens,
        block_table=table, block_size=bs, slot_mapping=slots, prepared={},
    )  # fmt: skip
    io = SplitViews(k_cache, v_cache, table)
    KVSmoothEngine().prepare_step(plan, rows, kernel=True)
    want = k_cache.clone()
    for i in range(n):  # the expected EMA, row by row with the method's own math
        cfg = cfgs[i % 2]
        lam, _, _ = update_lambda(
            queue0[i, 0, : cfg.window][None], count0[i, 0][None], entropy[i].mean()[None], cfg
        )
        if seq_lens[i] - 1 == prompt_lens[i] and not cfg.smooth_first_token:
            lam = torch.zeros_like(lam)
        p = seq_lens[i] - 1
        prev, cur = k_cache[table[i, (p - 1) // bs], (p - 1) % bs], k_cache[table[i, p // bs], p % bs]
        want[table[i, p // bs], p % bs] = ema(prev[None], cur[None], lam)[0]
    call = LayerCall.reading(
        io, layer=0, scale=d**-0.5, query=torch.zeros(n, hq, d), output=torch.zeros(n, hq, d),
        query_start_loc=qsl, seq_lens=seq_lens, slot_mapping=slots, runtime=runtime, plan=plan,
    )  # fmt: skip
    counter, lse = _Ops(), torch.zeros(n, hq)
    with counter, counter.outside_launches():
        KVSmoothEngine().after_kernel(call, rows, lse, entropy)
    return counter.ops, k_cache, want


class _Ops(TorchDispatchMode):
    """Counts the host's torch ops; an interpreted Triton launch (its argument copies to NumPy: on a
    GPU the kernel's work) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not self.paused
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def outside_launches(self):
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def grid(executor, *args, **kwargs):
            self.paused = True
            try:
                return launch(executor, *args, **kwargs)
            finally:
                self.paused = False

        interpreter.GridExecutor.__call__ = grid
        try:
            yield
        finally:
            interpreter.GridExecutor.__call__ = launch


#: The most host torch ops one smoothed layer call's ``after_kernel`` may dispatch with two configs
#: (two groups) in this harness, whatever the row count: none, the step's launch arguments are made by
#: the builder and each group is one launch of :mod:`vllm_halluguard.kernels.kvsmooth_update`. In torch
#: (the entropies' mean, FIFO push and rank, two-slot read, EMA and write) that work took 44 ops per
#: group, and row by row ~40 per row.
OPS_BUDGET = 0


def test_a_smoothed_layer_call_is_a_fixed_op_sequence_over_its_rows():
    ops_few, k_few, want_few = _layer_call(4)
    ops_many, k_many, want_many = _layer_call(24)
    torch.testing.assert_close(k_few, want_few)
    torch.testing.assert_close(k_many, want_many)
    assert ops_few == ops_many <= OPS_BUDGET, (ops_few, ops_many)


def _torch_path_step(n: int, layers: tuple[int, ...]) -> tuple[list[int], list, list]:
    """One step of KVSmooth's torch path (the CPU engine's) over ``n`` decode rows of two configs in a
    model of 4 layers, each layer's cache vLLM's packed CPU pages: ``run`` called in every layer, as the
    layer plans do. Returns the ops dispatched per layer call, each layer's K cache after the step and
    the expected K cache (the method's own math, row by row and layer by layer)."""
    g = torch.Generator().manual_seed(5)
    bs, hkv, hq, d, num_layers = 16, 2, 4, 32, 4
    table = torch.arange(4 * n).view(n, 4).flip(1).contiguous()
    seq_lens = [20 + (7 * i) % 40 for i in range(n)]
    prompt_lens = [s - 1 if i % 3 == 0 else s - 5 for i, s in enumerate(seq_lens)]
    slots = torch.tensor([int(table[i, (s - 1) // bs]) * bs + (s - 1) % bs for i, s in enumerate(seq_lens)])
    cfgs = (
        KVSmoothConfig(lam_ref=0.5, window=4, layers=layers, smooth_first_token=False),
        KVSmoothConfig(lam_ref=0.7, window=15, layers=layers[-1:]),
    )
    rows = [Row(i, RequestState(f"r{i}", i, cfgs[i % 2], p)) for i, p in enumerate(prompt_lens)]
    runtime = SimpleNamespace(capacity=n, num_layers=num_layers, ext={})
    KVSmoothEngine().setup(runtime)
    buf: Buffers = runtime.ext["kvsmooth"]
    buf.queue[:, :, :3] = torch.rand(n, num_layers, 3, generator=g)
    buf.count[:] = 3
    queue0, count0 = buf.queue.clone(), buf.count.clone()
    ios, keys, values = [], [], []
    for _ in range(num_layers):
        cache = torch.zeros(4 * n, hkv, bs, 2 * d)
        k, v = torch.randn(2, n, 4 * bs, hkv, d, generator=g).unbind(0)
        pos = torch.arange(4 * bs)
        for r in range(n):
            write_kv(cache, k[r], v[r], table[r, pos // bs] * bs + pos % bs, "vec")
        ios.append(CPUPages(cache, table, "vec", "auto"))
        keys.append(k)
        values.append(v)
    queries = torch.randn(num_layers, n, hq, d, generator=g)
    qsl = list(range(n + 1))
    plan = SimpleNamespace(
        query_start_loc=qsl, seq_lens=seq_lens, block_table=table.to(torch.int32), block_size=bs,
        slot_mapping=slots, prepared={},
    )  # fmt: skip
    KVSmoothEngine().prepare_step(plan, rows, kernel=False)
    want = [k.clone() for k in keys]
    for layer in range(num_layers):
        for i, row in enumerate(rows):
            cfg = cast(KVSmoothConfig, row.request.config)
            if layer not in cfg.layers:
                continue
            p = seq_lens[i] - 1
            q = queries[layer, i].view(hkv, hq // hkv, d)
            logits = torch.einsum("kgd,skd->kgs", q, keys[layer][i, : p + 1]).reshape(hq, -1) * d**-0.5
            z = row_entropy(torch.softmax(logits, -1)).mean()[None]
            lam, _, _ = update_lambda(queue0[i, layer, : cfg.window][None], count0[i, layer][None], z, cfg)
            if p == prompt_lens[i] and not cfg.smooth_first_token:
                lam = torch.zeros_like(lam)
            k = keys[layer][i]
            want[layer][i, p] = ema(k[p - 1][None], k[p][None], lam)[0]
    ops = []
    for layer, io in enumerate(ios):
        call = LayerCall.reading(
            io, layer=layer, scale=d**-0.5, query=queries[layer], output=torch.zeros(n, hq, d),
            query_start_loc=qsl, seq_lens=seq_lens, slot_mapping=slots, runtime=runtime, plan=plan,
        )  # fmt: skip
        counter = _Ops()
        with counter:
            KVSmoothEngine().run(call, rows)
        ops.append(counter.ops)
    got = []
    for io in ios:
        ids, _ = page_ids(table, torch.tensor([4 * bs] * n), 4 * bs, bs)
        got.append(io.read_keys(ids, 4 * bs))
    return ops, got, want


@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native-kernel"])
def test_the_torch_path_smooths_a_steps_layers_together_at_the_last(native, monkeypatch):
    """The CPU engine's torch path equals the method's math layer by layer. With torch ops its smoothed
    layers cost one pass per step: a layer before the group's last only keeps its query rows (one op), so
    a step smoothing three layers costs little more than one smoothed layer (before, each smoothed layer
    call dispatched the whole computation, ~70 ops per config group). With the native CPU kernel each
    smoothed layer is one call per config group, with a few ops around it."""
    from vllm_halluguard.kernels import cpu_native

    monkeypatch.setenv(cpu_native.NATIVE_ENV, "1" if native else "0")
    calls = []
    real = cpu_native.kvsmooth_layer
    monkeypatch.setattr(cpu_native, "kvsmooth_layer", lambda *a, **k: calls.append(a[9]) or real(*a, **k))
    ops_one, got_one, want_one = _torch_path_step(6, (2,))
    ops_three, got_three, want_three = _torch_path_step(6, (0, 1, 2))
    for got, want in ((got_one, want_one), (got_three, want_three)):
        for layer in range(4):
            torch.testing.assert_close(got[layer], want[layer])
    if native:  # per smoothed layer and config group one call (the second config smooths layer 2 only)
        assert calls == [2, 2, 0, 1, 2, 2], calls
        assert ops_three[3] == 0 and max(ops_three) <= 16, ops_three
        return
    assert not calls
    assert ops_three[0] <= 1 and ops_three[1] <= 1 and ops_three[3] == 0, ops_three
    # each extra layer of a group: its query rows, K gather, two-slot read and write (measured 14)
    assert sum(ops_three) <= ops_one[2] + 2 * 16, (ops_one, ops_three)
