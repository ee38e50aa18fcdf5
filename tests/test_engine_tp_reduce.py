"""The tensor-parallel reduction (engine/tp.py) on one layer's heads split into two ranks: two threads, each
holding half the heads, whose all-reduce really sums their partials. The reduced statistics and the
decisions they feed (KVSmooth's lambda, PruneHal's vote and keep masks, FarSight's sinks) equal those
computed from all heads at once.

Device discipline: vLLM's all-reduce on CUDA is ``torch.ops.vllm.all_reduce``, registered for the CUDA
dispatch key only, so a statistic moved to the host before its reduction kills the worker there while
gloo accepts it on CPU. The last tests run the methods' layer paths on a simulated device
(``tests/helpers/device_sim.py``) with a group that refuses host tensors, as CUDA's op does."""

import contextlib
import threading
from types import SimpleNamespace

import pytest
import torch

from helpers.device_sim import SIM_DEVICE, DeviceDisciplineError, on_device, require_device, simulated_device
from vllm_halluguard.engine import tp
from vllm_halluguard.engine.cache_io import SplitViews
from vllm_halluguard.engine.farsight import row_sinks, steady_sinks
from vllm_halluguard.engine.kvsmooth import Buffers, KVSmoothEngine, entropy
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.prunehal import PruneHalEngine, PruneState
from vllm_halluguard.engine.state import RequestState, Row
from vllm_halluguard.kernels.reference import attention_logits
from vllm_halluguard.methods.farsight import FarSightConfig
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig, head_entropy, update_lambda
from vllm_halluguard.methods.prunehal import (
    PruneHalConfig,
    prune_step,
    scores_statistic,
    visual_attention_stats,
)

HEADS = 8


class ThreadGroup:
    """A process group of ``world`` threads: ``all_reduce`` sums the tensors every rank contributed."""

    def __init__(self, world: int, device: bool = False) -> None:
        self.world, self.device = world, device  # device: all_reduce takes device tensors only (CUDA)
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = 0

    def member(self, rank: int) -> "Member":
        return Member(self, rank)


class Member:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank_in_group, self.world_size = group, rank, group.world
        self.device = SIM_DEVICE if group.device else torch.device("cpu")

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g.device:
            require_device(input_, "all_reduce")
        g.slots[self.rank_in_group] = input_.clone()
        g.barrier.wait()
        total = torch.stack(g.slots).sum(0)  # type: ignore[arg-type]
        g.calls += self.rank_in_group == 0
        g.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return total


_local = threading.local()


@pytest.fixture(autouse=True)
def _thread_tp_group(monkeypatch):
    """``tp.tp_group()`` is the calling thread's rank of :func:`on_ranks` (as vLLM's is the worker's)."""
    monkeypatch.setattr(tp, "tp_group", lambda: getattr(_local, "group", None) or tp._SINGLE)


def on_ranks(world: int, fn, device: bool = False):
    """Run ``fn(group, rank)`` on ``world`` threads, each its own rank of one group; their results by
    rank, and the group."""
    group, results, errors = ThreadGroup(world, device), [None] * world, []

    def run(rank: int) -> None:
        _local.group = group.member(rank)
        try:
            results[rank] = fn(_local.group, rank)
        except BaseException as e:  # surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results, group


def _heads(rank: int, world: int, x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)


def _probs(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=g), -1)


def test_one_rank_is_the_plain_mean_and_communicates_nothing():
    x = torch.randn(3, HEADS, 5)
    (out,), group = on_ranks(1, lambda g, r: tp.head_mean(x, -2, g))
    assert torch.equal(out, x.mean(-2)) and group.calls == 0
    assert torch.equal(tp.head_mean(x, 1), x.mean(1))  # no group: one rank


@pytest.mark.parametrize("world", [2, 4])
def test_head_mean_of_split_heads_is_the_mean_over_all_heads(world):
    x = torch.randn(3, HEADS, 5, dtype=torch.float64)
    outs, group = on_ranks(world, lambda g, r: tp.head_mean(_heads(r, world, x, 1), 1, g))
    for out in outs:
        torch.testing.assert_close(out, x.mean(1).float(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(out, outs[0]) for out in outs), "ranks must hold the same value"
    assert group.calls == 1
    # a rank that skipped the reduction would see only its own heads' mean: the test can tell them apart
    assert not torch.allclose(_heads(0, world, x, 1).mean(1).float(), x.mean(1).float(), atol=1e-3)


def test_rank_mean_and_head_slice():
    x = torch.randn(4, HEADS)
    outs, _ = on_ranks(2, lambda g, r: tp.rank_mean(_heads(r, 2, x, 1).mean(1), g))
    torch.testing.assert_close(outs[0], x.mean(1))
    slices, _ = on_ranks(2, lambda g, r: tp.head_slice(HEADS // 2, g))
    assert slices == [(HEADS, slice(0, 4)), (HEADS, slice(4, 8))]


@pytest.mark.parametrize("reduce", ["mean_entropy", "entropy_of_mean"])
def test_kvsmooth_entropy_and_lambda_of_split_heads_equal_the_unsplit(reduce):
    probs = _probs(6, HEADS, 40, seed=1)  # 6 decode rows of one layer
    cfg = KVSmoothConfig(lam_ref=0.5, window=4, head_reduce=reduce)
    queue, count = torch.rand(6, 4), torch.tensor([0, 1, 3, 4, 7, 9])

    outs, _ = on_ranks(2, lambda g, r: entropy(_heads(r, 2, probs, 1), reduce))
    whole = head_entropy(probs, reduce)
    for z in outs:
        torch.testing.assert_close(z, whole, rtol=1e-5, atol=1e-6)
        lam, _, _ = update_lambda(queue, count, z, cfg)
        assert torch.equal(lam, update_lambda(queue, count, whole, cfg)[0])
    alone = head_entropy(_heads(0, 2, probs, 1), reduce)  # one rank's heads only: another entropy
    assert not torch.allclose(alone, whole, atol=1e-3)


@pytest.mark.parametrize("statistic", ["mean", "mass"])
def test_prunehal_statistics_vote_and_keep_of_split_heads_equal_the_unsplit(statistic):
    b, layers, nv = 3, 2, 24
    probs = _probs(b, layers, HEADS, nv, seed=2) * 0.6  # last row's probabilities on the visual keys
    keep = torch.ones(b, layers, nv, dtype=torch.bool)
    keep[1, :, ::3] = False
    cfg = PruneHalConfig(r=0.5, t=3, force_step=None, statistic=statistic, layers=(0, 1))

    def decide(A, scores, history):  # request 1's layers are far under their history: they vote
        return prune_step(torch.tensor([4, 4, 4]), cfg, keep, torch.zeros(b, dtype=torch.long), A, scores,
                          history, torch.ones(b, dtype=torch.long))  # fmt: skip

    on_visual = probs * keep[:, :, None]  # pruned keys have probability 0 (engine/prunehal.py)

    def rank(g, r):
        return scores_statistic(tp.head_mean(_heads(r, 2, on_visual, 2).float(), -2), keep, statistic)

    outs, _ = on_ranks(2, rank)
    A, scores = visual_attention_stats(on_visual, keep, statistic)
    history = A * torch.tensor([[1.0], [3.0], [1.0]])
    fired, kept, *_ = decide(A, scores, history)
    assert fired.tolist() == [False, True, False], "the vote would not be exercised"
    for A_r, scores_r in outs:
        torch.testing.assert_close(A_r, A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores_r, scores, rtol=1e-5, atol=1e-7)
        fired_r, kept_r, *_ = decide(A_r, scores_r, history)
        assert torch.equal(fired_r, fired) and torch.equal(kept_r, kept)


@pytest.mark.parametrize("mode", ["B", "C"])
def test_farsight_sinks_of_each_rank_are_its_own_heads(mode):
    cfg = FarSightConfig(mode=mode)
    positions, prompt_len = torch.arange(10), 12
    whole = row_sinks(cfg, positions, prompt_len, HEADS)

    def rank(g, r):
        return row_sinks(cfg, positions, prompt_len, HEADS // 2), steady_sinks(cfg, HEADS // 2)

    outs, _ = on_ranks(2, rank)
    assert torch.equal(torch.cat([o[0] for o in outs], dim=1), whole)
    assert torch.equal(torch.cat([o[1] for o in outs]), steady_sinks(cfg, HEADS))
    assert not torch.equal(outs[1][0], whole[:, : HEADS // 2]), "ALiBi slopes differ per head"


# ----------------------------------------------------------------------------- device discipline

HKV, D = 2, 16
SEQ = [40, 29]  # two decode rows; their prompts hold the image (positions 3..22)
PROMPT = [38, 27]


def _layer_world(seed: int):
    """Dense K/V and the decode queries of two PruneHal rows, one of which has pruned keys already."""
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(n, HKV, D, generator=g) for n in SEQ]
    v = [torch.randn(n, HKV, D, generator=g) for n in SEQ]
    q = torch.randn(len(SEQ), HEADS, D, generator=g)
    visual = torch.arange(3, 23)
    rows = []
    for r, prompt in enumerate(PROMPT):
        cfg = PruneHalConfig(r=0.5, t=3, layers=(0,), force_step=None)
        state = RequestState(f"req{r}", r, cfg, prompt)
        st = PruneState.fresh(visual, (0,), {"prompt_len": prompt, "steps": 0, "prunes": []})
        if r == 1:  # pruned by an earlier decision, which the host has read
            st.keep[0, ::3] = False
            st.host_keep[0, ::3] = False
            st.host_kept[0], st.pruned_layers = False, frozenset({0})
        st.hist_sum, st.hist_n = torch.full((1, 1), 0.3), torch.ones(1, dtype=torch.long)
        state.scratch["prunehal"] = st
        rows.append(Row(r, state))
    return k, v, q, rows


def _layer_call(k, v, q, heads: slice, kv_heads: slice, device: bool) -> LayerCall:
    """One layer call of this rank's heads over a paged cache (blocks of 16, rows' blocks interleaved);
    with ``device`` its tensors are on the simulated device."""
    move = on_device if device else (lambda x: x)
    bs, n_blocks = 16, [-(-n // 16) for n in SEQ]
    table = torch.zeros(len(SEQ), max(n_blocks), dtype=torch.int32)
    kc = torch.zeros(sum(n_blocks) + 1, bs, HKV, D)  # block 0 stays unused, as vLLM's null block
    vc = torch.zeros_like(kc)
    for r, n in enumerate(SEQ):
        ids = torch.arange(n_blocks[r]) * len(SEQ) + r + 1  # row 0: 1, 3, 5; row 1: 2, 4
        table[r, : n_blocks[r]] = ids
        pos = torch.arange(n)
        kc[ids[pos // bs], pos % bs], vc[ids[pos // bs], pos % bs] = k[r], v[r]
    kc, vc = move(kc[:, :, kv_heads].contiguous()), move(vc[:, :, kv_heads].contiguous())
    io = SplitViews(kc, vc, move(table))
    runtime = SimpleNamespace(block_size=bs, num_layers=1, stats={}, ext={})
    query = move(q[:, heads].contiguous())
    return LayerCall(
        layer=0, scale=D**-0.5, query=query, output=torch.zeros_like(query), query_start_loc=[0, 1, 2],
        seq_lens=list(SEQ), slot_mapping=move(torch.tensor(SEQ) - 1), runtime=runtime, gather=io.gather,
        write=io.write, gather_batch=io.gather_batch, gather_slots=io.gather_slots,
    )  # fmt: skip


def _kernel_lse(call: LayerCall, rows: list[Row]) -> torch.Tensor:
    """What the kernel hands ``after_kernel``: each row's LSE over its kept keys (on the call's device)."""
    lse = []
    for row in rows:
        st = row.request.scratch["prunehal"]
        mask = torch.ones(SEQ[row.index], dtype=torch.bool)
        mask[st.visual] = st.keep[0]
        k, _ = call.gather(row.index, SEQ[row.index])
        pos = torch.tensor([SEQ[row.index] - 1])
        q, k = (x.as_subclass(torch.Tensor) for x in (call.query[row.index : row.index + 1], k))
        lse.append(torch.logsumexp(attention_logits(q, k, call.scale, pos, mask), -1))
    out = torch.cat(lse)
    return out.to(call.query.device)


def _prunehal_layer(path: str, world: int, device: bool, seed: int = 5):
    """PruneHal's layer path (``after_kernel``: the GPU kernel path; ``run``: the batched torch path,
    which the GPU path also takes for a prompt's last token) on ``world`` ranks; each rank's A, scores
    and keep masks."""
    k, v, q, _ = _layer_world(seed)

    def rank(g, r):
        _, _, _, rows = _layer_world(seed)  # each rank its own request state, as each worker has
        hq, hkv = HEADS // world, HKV // world
        with simulated_device() if device else contextlib.nullcontext():
            call = _layer_call(k, v, q, slice(r * hq, (r + 1) * hq), slice(r * hkv, (r + 1) * hkv), device)
            if path == "after_kernel":
                lse = _kernel_lse(call, rows)
                PruneHalEngine().after_kernel(call, rows, lse, torch.zeros_like(lse))
            else:
                PruneHalEngine().run(call, rows)
        sts = [row.request.scratch["prunehal"] for row in rows]
        assert all(st.A.device == st.keep.device == call.query.device for st in sts), "state on the device"
        return [(st.A.cpu(), st.scores.cpu(), st.keep.cpu()) for st in sts]

    outs, _ = on_ranks(world, rank, device)
    return outs


def test_the_simulated_device_refuses_host_tensors_where_cuda_does():
    with simulated_device() as transfers:
        x = torch.randn(3, 4).to(SIM_DEVICE)
        assert x.device == SIM_DEVICE and (x * 2).device == SIM_DEVICE
        assert (x + torch.tensor(1.0)).device == SIM_DEVICE  # a host 0-dim tensor is a scalar
        assert x[torch.tensor([0, 2])].device == SIM_DEVICE  # host indices may index device tensors
        with pytest.raises(DeviceDisciplineError, match="mul"):
            x * torch.ones(4)
        with pytest.raises(DeviceDisciplineError, match="stack"):
            torch.stack([x[0], torch.ones(4)])
        host = x.sum(0).cpu()
        assert host.device.type == "cpu" and not isinstance(host, type(x))
        assert [what for what, _ in transfers] == ["cpu"]
        with pytest.raises(DeviceDisciplineError, match="all_reduce got a host tensor"):
            require_device(host, "all_reduce")


@pytest.mark.parametrize("path", ["after_kernel", "run"])
def test_prunehal_reduces_its_statistics_on_the_device(path):
    """The statistics reach the tensor-parallel all-reduce on the layer's device (CUDA's all-reduce op
    takes nothing else), the request state stays there, and the two ranks decide what one rank holding
    all heads decides."""
    whole = _prunehal_layer(path, 1, device=False)[0]
    for ranks in _prunehal_layer(path, 2, device=True):
        for (A, scores, keep), (A1, scores1, keep1) in zip(ranks, whole, strict=True):
            torch.testing.assert_close(A, A1, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(scores, scores1, rtol=1e-5, atol=1e-7)
            assert torch.equal(keep, keep1)
    assert whole[1][2][0].sum() < 20, "the pruned row must be in the test"


def test_kvsmooth_kernel_path_reduces_its_entropy_on_the_device():
    """KVSmooth's ``after_kernel``: the kernel's per-head entropies are reduced on the device."""
    g = torch.Generator().manual_seed(7)
    entropy = torch.rand(2, HEADS, generator=g) * 3

    def rank(grp, r):
        cfg = KVSmoothConfig(lam_ref=0.5, window=4, layers=(0,))
        rows = [Row(i, RequestState(f"r{i}", i, cfg, 20)) for i in range(2)]
        k, v, q, _ = _layer_world(1)
        written = []
        with simulated_device():
            call = _layer_call(k, v, q, slice(r * 4, r * 4 + 4), slice(r, r + 1), device=True)
            call.seq_lens = [21, 21]

            def slots(rows, positions):
                kk = torch.stack(
                    [call.gather(i, 21)[0][positions[b].to(SIM_DEVICE)] for b, i in enumerate(rows)]
                )
                return kk, kk.clone()

            call.gather_slots = slots
            call.write = lambda s, kk, vv: written.append(kk)
            call.runtime.ext["kvsmooth"] = Buffers(torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.long))
            KVSmoothEngine().after_kernel(
                call, rows, on_device(torch.zeros(2, 4)), on_device(entropy[:, r * 4 : r * 4 + 4])
            )
        return call.runtime.ext["kvsmooth"].queue[:, 0, 0].clone()

    outs, _ = on_ranks(2, rank, device=True)
    for queue in outs:
        torch.testing.assert_close(queue, entropy.mean(1))


def test_a_host_statistic_is_refused_by_name_before_a_device_group_reduces_it():
    def rank(g, r):
        with simulated_device():
            x = torch.rand(3, HEADS // 2).to(SIM_DEVICE)
            assert tp.head_mean(x, -1, g).device == SIM_DEVICE  # on the device: reduced
            with pytest.raises(RuntimeError, match="reduce on the layer's device"):
                tp.head_mean(x.cpu(), -1, g)
        return True

    assert on_ranks(2, rank, device=True)[0] == [True, True]


def test_prunehal_kernel_path_reads_the_statistics_of_the_torch_path():
    """``after_kernel`` (the visual keys gathered alone, the kernel's LSE) measures what the torch path
    measures from the whole sequence's K and V, on a row with pruned keys and one without."""
    kernel = _prunehal_layer("after_kernel", 1, device=False)[0]
    torch_path = _prunehal_layer("run", 1, device=False)[0]
    for (A, scores, keep), (A1, scores1, keep1) in zip(kernel, torch_path, strict=True):
        torch.testing.assert_close(A, A1, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores, scores1, rtol=1e-5, atol=1e-7)
        assert torch.equal(keep, keep1)
