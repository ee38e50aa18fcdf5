"""The batched CPU path (padded gather, padded attention, ``apply_batch``) equals the per-row path."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from vllm_halluguard.engine.cpu_cache import (
    gather_kv,
    gather_kv_batched,
    gather_slots,
    learn_layout,
    write_kv,
)
from vllm_halluguard.engine.kvsmooth import Buffers
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.prunehal import PruneState, read_decisions
from vllm_halluguard.engine.registry import method_of
from vllm_halluguard.engine.state import RequestState, Row
from vllm_halluguard.kernels.reference import attention_logits, attention_rows, attention_rows_padded
from vllm_halluguard.methods.farsight import FarSightConfig
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig
from vllm_halluguard.methods.prunehal import PruneHalConfig
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW

HQ, HKV, D, BS, LAYERS = 4, 2, 32, 16, 4


def _packed_cache(dtype: torch.dtype, head_size: int, seq_lens: list[int], g: torch.Generator):
    """A cache full of junk with each sequence's K/V written over shuffled blocks; stale table tails."""
    need = [-(-n // BS) for n in seq_lens]
    nb = sum(need) + 3
    cache = torch.randn(nb, HKV, BS, 2 * head_size, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    table = torch.full((len(seq_lens), max(need) + 2), nb + 7, dtype=torch.int32)  # out of range
    keys, values, off = [], [], 0
    for r, (n, m) in enumerate(zip(seq_lens, need, strict=True)):
        table[r, :m] = perm[off : off + m].to(torch.int32)
        off += m
        key = torch.randn(n, HKV, head_size, generator=g).to(dtype)
        value = torch.randn(n, HKV, head_size, generator=g).to(dtype)
        pos = torch.arange(n)
        write_kv(cache, key, value, table[r].long()[pos // BS] * BS + pos % BS, "vec")
        keys.append(key)
        values.append(value)
    return cache, table, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [32, 64])
def test_batched_gather_equals_per_row_gather(dtype, head_size):
    g = torch.Generator().manual_seed(1)
    seq_lens = [70, 5, 33, 16, 1]
    cache, table, keys, values = _packed_cache(dtype, head_size, seq_lens, g)
    layout = learn_layout("vec", dtype, BS, head_size)
    rows = [3, 0, 4, 2]  # a subset, out of order
    lens = [seq_lens[r] for r in rows]
    k, v, valid = gather_kv_batched(cache, table, rows, lens, layout)
    assert k.shape == v.shape == (len(rows), max(lens), HKV, head_size)
    assert torch.equal(valid, torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None])
    for b, r in enumerate(rows):
        n = seq_lens[r]
        k1, v1 = gather_kv(cache, table[r], n, layout)
        assert torch.equal(k[b, :n], k1) and torch.equal(v[b, :n], v1)
        assert torch.equal(k1, keys[r]) and torch.equal(v1, values[r])
        assert not k[b, n:].any() and not v[b, n:].any()  # padding is zero, not the junk around it
    k_only, none, valid_k = gather_kv_batched(cache, table, rows, lens, layout, values=False)
    assert none is None and torch.equal(k_only, k) and torch.equal(valid_k, valid)
    # a few slots per row, anywhere in the sequence (block edges included)
    positions = torch.tensor([[0, 15, 8], [69, 16, 15], [0, 0, 0], [32, 15, 16]])  # rows of 16, 70, 1, 33
    ks, vs = gather_slots(cache, table, rows, positions, layout)
    assert ks.shape == vs.shape == (len(rows), 3, HKV, head_size)
    for b, r in enumerate(rows):
        assert torch.equal(ks[b], keys[r][positions[b]]) and torch.equal(vs[b], values[r][positions[b]])


def test_padded_attention_rows_equal_per_row_attention():
    g = torch.Generator().manual_seed(2)
    lens = [9, 40, 1, 23]
    b, s = len(lens), max(lens)
    q = torch.randn(b, HQ, D, generator=g)
    k = torch.randn(b, s, HKV, D, generator=g)
    v = torch.randn(b, s, HKV, D, generator=g)
    valid = torch.arange(s)[None, :] < torch.tensor(lens)[:, None]
    key_mask = valid.clone()
    key_mask[1, 3:30:2] = False  # a pruned row
    sink = torch.randn(b, HQ, generator=g)
    sink[2] = -math.inf  # a row without a sink
    for mask, sinks in ((valid, None), (key_mask, sink)):
        out, lse, probs = attention_rows_padded(q, k, v, 0.3, mask, sinks)
        for i, n in enumerate(lens):
            km = None if mask is valid else mask[i, :n]
            pos = torch.tensor([n - 1])
            ref_out, ref_lse, _ = attention_rows(
                q[i : i + 1], k[i, :n], v[i, :n], 0.3, pos, None if sinks is None else sinks[i : i + 1], km
            )
            torch.testing.assert_close(out[i], ref_out[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(lse[i], ref_lse[0], atol=1e-6, rtol=1e-5)
            ref_probs = torch.softmax(attention_logits(q[i : i + 1], k[i, :n], 0.3, pos, km), -1)[0]
            torch.testing.assert_close(probs[i, :, :n], ref_probs, atol=1e-6, rtol=1e-5)
            assert not probs[i, :, n:].any()


# ----------------------------------------------------------------------------- methods, end to end


@dataclass
class World:
    """A fake engine for one layer call at a time: paged cache, block table, runtime, native output."""

    cache: torch.Tensor
    table: torch.Tensor
    seq_lens: list[int]
    runtime: SimpleNamespace
    rows: list[Row]

    def slot(self, r: int, pos: int) -> int:
        return int(self.table[r, pos // BS]) * BS + pos % BS

    def clone(self) -> World:
        rt = SimpleNamespace(**vars(self.runtime))
        buf = rt.ext["kvsmooth"]
        rt.ext = {"kvsmooth": Buffers(buf.queue.clone(), buf.count.clone())}
        return World(self.cache.clone(), self.table, list(self.seq_lens), rt, copy.deepcopy(self.rows))

    def layer_call(self, layer: int, q: torch.Tensor, native: torch.Tensor, batched: bool) -> LayerCall:
        layout = learn_layout("vec", torch.float32, BS, D)
        n = len(self.seq_lens)

        def gather_batch(rows, lens, values=True):
            return gather_kv_batched(self.cache, self.table, rows, lens, layout, values)

        def slots(rows, positions):
            return gather_slots(self.cache, self.table, rows, positions, layout)

        return LayerCall(
            layer=layer,
            scale=D**-0.5,
            query=q,
            output=native,
            query_start_loc=list(range(n + 1)),
            seq_lens=list(self.seq_lens),
            slot_mapping=torch.tensor([self.slot(r, s - 1) for r, s in enumerate(self.seq_lens)]),
            runtime=self.runtime,  # type: ignore[arg-type]
            gather=lambda row, s: gather_kv(self.cache, self.table[row], s, layout),
            write=lambda slots, k, v: write_kv(self.cache, k, v, slots, "vec"),
            gather_batch=gather_batch if batched else None,
            gather_slots=slots if batched else None,
        )


# PruneHal's step 1 is the prompt's last token, which this world never runs (it starts decoding): step 2 is
# its first decode step, so row 6 prunes there and rows 3 and 9 one step later.
CONFIGS = {  # batch row -> config (row 0 is plain)
    1: KVSmoothConfig(lam_ref=0.5, layers=(0, 1, 2, 3)),
    2: FarSightConfig(mode="B"),
    3: PruneHalConfig(r=0.5, t=2, layers=(0, 1, 2, 3), force_step=3),
    4: KVSmoothConfig(
        lam_ref=0.3,
        window=4,
        layers=(1, 2),
        recursive=False,
        smooth_first_token=False,
        head_reduce="entropy_of_mean",
    ),
    5: FarSightConfig(mode="C"),
    6: PruneHalConfig(r=0.6, t=3, layers=(1, 2, 3), statistic="mass", force_step=2),
    7: FarSightConfig(mode="B", layers=(1, 2), sigma=0.5),
    8: KVSmoothConfig(lam_ref=0.5, layers=(0, 1, 2, 3)),
    9: PruneHalConfig(
        r=0.5, t=2, layers=(0, 1, 2, 3), force_step=3
    ),  # row 3's config and visual count: one decision
}
PROMPTS = [30, 41, 18, 37, 25, 12, 50, 16, 33, 40]
VISUAL = {3: torch.arange(4, 30), 6: torch.arange(10, 45), 9: torch.arange(12, 38)}


def _world(g: torch.Generator) -> World:
    steps = 6
    need = [-(-(n + steps) // BS) for n in PROMPTS]
    nb = sum(need) + 2
    cache = torch.randn(nb, HKV, BS, 2 * D, generator=g)
    perm = torch.randperm(nb, generator=g)
    table = torch.full((len(PROMPTS), max(need) + 1), 0, dtype=torch.int32)
    off = 0
    for r, m in enumerate(need):
        table[r, :m] = perm[off : off + m].to(torch.int32)
        off += m
    rt = SimpleNamespace(
        ext={
            "kvsmooth": Buffers(
                torch.zeros(16, LAYERS, MAX_KVSMOOTH_WINDOW), torch.zeros(16, LAYERS, dtype=torch.long)
            )
        },
        block_size=BS,
        num_layers=LAYERS,
    )
    rows = []
    for r, cfg in CONFIGS.items():
        state = RequestState(f"req{r}", 15 - r, cfg, PROMPTS[r])
        if r in VISUAL:
            record = {"prompt_len": PROMPTS[r], "steps": 0, "prunes": [], "reclaimable_blocks": 0}
            layers = tuple(cfg.layers)  # type: ignore[attr-defined]
            state.scratch["prunehal"] = PruneState.fresh(VISUAL[r], layers, record)
        rows.append(Row(r, state))
    world = World(cache, table, list(PROMPTS), rt, rows)
    for r, n in enumerate(PROMPTS):  # the prompts' K/V
        slots = torch.tensor([world.slot(r, p) for p in range(n)])
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        write_kv(cache, k, v, slots, "vec")
    return world


def run_methods(call: LayerCall, rows: list[Row]) -> None:
    """The torch path of one layer call: each method's ``run`` over its rows (as the engine does)."""
    by_method: dict[str, list[Row]] = {}
    for row in rows:
        by_method.setdefault(row.request.config.name, []).append(row)
    for rows_of_method in by_method.values():
        method_of(rows_of_method[0].request.config).run(call, rows_of_method)


def test_apply_batch_equals_per_row_apply_over_decode_steps():
    g = torch.Generator().manual_seed(3)
    per_row = _world(g)
    batched = per_row.clone()
    n = len(PROMPTS)
    for _ in range(5):  # decode steps: every row appends one token, then each layer runs the methods
        new = [(torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g)) for _ in range(n)]
        for world in (per_row, batched):
            for r in range(n):
                world.seq_lens[r] += 1
                write_kv(world.cache, *new[r], torch.tensor([world.slot(r, world.seq_lens[r] - 1)]), "vec")
        for layer in range(LAYERS):
            q = torch.randn(n, HQ, D, generator=g)
            native = torch.randn(n, HQ, D, generator=g)
            outs = []
            for world, mode in ((per_row, False), (batched, True)):
                call = world.layer_call(layer, q, native.clone(), mode)
                run_methods(call, world.rows)
                outs.append(call.output)
            torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(outs[1][[0, 1, 4, 5, 8]], native[[0, 1, 4, 5, 8]])  # untouched rows
            assert not torch.equal(outs[1][2], native[2])  # FarSight B reworks every layer
        for world in (per_row, batched):  # the end of the step: the host reads PruneHal's decisions
            read_decisions(world.runtime)
    torch.testing.assert_close(batched.cache, per_row.cache, atol=1e-6, rtol=1e-6)
    layout = learn_layout("vec", torch.float32, BS, D)
    for r in (1, 4):  # KVSmooth smoothed the last token's cached K/V (lambda >= 0.1 for both configs)
        k, v = gather_kv(batched.cache, batched.table[r], batched.seq_lens[r], layout)
        assert not torch.allclose(k[-1], new[r][0][0]) and not torch.allclose(v[-1], new[r][1][0])
    got, want = batched.runtime.ext["kvsmooth"], per_row.runtime.ext["kvsmooth"]
    torch.testing.assert_close(got.queue, want.queue, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.count, want.count)
    counts = got.count.sum(-1)
    assert int(counts[15 - 1]) == 5 * 4 and int(counts[15 - 4]) == 5 * 2  # rows 1 and 4: layers x steps
    for a, b in zip(per_row.rows, batched.rows, strict=True):
        if "prunehal" in a.request.scratch:
            sa, sb = a.request.scratch["prunehal"], b.request.scratch["prunehal"]
            assert sa.record["prunes"] and sa.record["prunes"] == sb.record["prunes"]
            assert torch.equal(sa.keep, sb.keep) and torch.equal(sa.count, sb.count)
            torch.testing.assert_close(sb.A, sa.A, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(sb.scores, sa.scores, atol=1e-6, rtol=1e-5)
