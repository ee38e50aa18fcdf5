"""KVSmooth's fused per-layer update (:mod:`vllm_halluguard.kernels.kvsmooth_update`) against the torch
:func:`~vllm_halluguard.engine.kvsmooth.smooth_group` of the same group, on random paged caches.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).
The FIFO, the push counts and both caches (the whole tensors: untouched slots included) are compared
bit for bit when the kernel is given the torch head mean ``z``; with the head mean taken in the kernel
the FIFO's new entries may differ from ``torch.mean`` by rounding (a different summation order).
Triton's interpreter casts fp32 to bf16 by truncation (a compiled kernel rounds to nearest even, as
torch does), so interpreted bf16 caches are compared to within one bf16 ulp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_halluguard.engine.cache_io import CPUPages, SplitViews
from vllm_halluguard.engine.cpu_cache import write_kv
from vllm_halluguard.engine.kvsmooth import Buffers, Group, smooth_group, smooth_group_kernel
from vllm_halluguard.kernels import kvsmooth_update as KU
from vllm_halluguard.kernels import triton_attention as TA
from vllm_halluguard.kernels.layouts import allocate_kv_cache, split_kv
from vllm_halluguard.methods.kvsmooth import KVSmoothConfig
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or TA.INTERPRETED, "run through pytest (conftest) or set TRITON_INTERPRET=1"
SLOTS, LAYERS, LAYER = 12, 3, 1


def _group(cfg: KVSmoothConfig, bs: int, b: int, g: torch.Generator, num_blocks: int, tokens: int) -> Group:
    """``b`` decode rows: distinct FIFO slots, tokens and cache blocks; positions at block starts
    (the previous slot in another block), inside blocks and at position 1."""
    mb = 3
    table = torch.randperm(num_blocks, generator=g)[: b * mb].view(b, mb)
    pos = torch.randint(1, mb * bs, (b,), generator=g)
    pos[0], pos[-1] = bs, 1  # across a block boundary; the first generated token after a 1-token prompt
    cur = table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    first = torch.rand(b, generator=g) < 0.4
    return Group(
        cfg, frozenset({LAYER}), torch.randperm(tokens, generator=g)[:b].to(DEVICE),
        torch.randperm(SLOTS, generator=g)[:b].to(DEVICE),
        None if cfg.smooth_first_token else first.to(DEVICE),
        cur.to(DEVICE), torch.stack([pos - 1, pos], 1).to(DEVICE), table.to(DEVICE),
        torch.arange(cfg.window, device=DEVICE), int(pos.max()) + 1,
    )  # fmt: skip


def _buffers(g: torch.Generator, window: int, ties: torch.Tensor | None, grp: Group) -> Buffers:
    """FIFOs with history: counts below, at and above the window; with ``ties`` (the rows' z) some
    entries equal to the value pushed next."""
    queue = torch.rand(SLOTS, LAYERS, MAX_KVSMOOTH_WINDOW, generator=g) * 3
    count = torch.randint(0, 3 * window + 2, (SLOTS, LAYERS), generator=g)
    count[grp.slot[:3].cpu(), LAYER] = torch.tensor([0, window - 1, window])[: min(3, len(grp.slot))]
    if ties is not None:
        queue[grp.slot.cpu(), LAYER, : min(window, 3)] = ties.cpu()[:, None]
    return Buffers(queue.to(DEVICE), count.to(DEVICE))


def _call(buf: Buffers, io, kernel_path: bool = True) -> SimpleNamespace:
    """A layer call; on the kernel path its plan has the step's device tables (``rows``)."""
    plan = SimpleNamespace(rows=object() if kernel_path else None)
    return SimpleNamespace(
        runtime=SimpleNamespace(ext={"kvsmooth": buf}), layer=LAYER, io=io, write=io.write, plan=plan
    )


def _clone(buf: Buffers) -> Buffers:
    return Buffers(buf.queue.clone(), buf.count.clone())


CASES = [  # window, rank_inclusive, rank_divisor, smooth_first_token, layout, block size, Hkv, Hq, D, dtype
    (4, False, "window", True, "hnd2d", 16, 2, 4, 8, torch.float32),
    (4, True, "filled", False, "triton", 32, 1, 4, 12, torch.float32),
    (15, False, "filled", False, "hnd2d", 32, 4, 8, 16, torch.float32),
    (15, True, "window", True, "flash", 16, 2, 2, 8, torch.bfloat16),
    (15, True, "filled", False, "hnd2d", 16, 3, 6, 8, torch.float16),
    (MAX_KVSMOOTH_WINDOW, False, "window", False, "triton", 16, 2, 4, 8, torch.float32),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"m{c[0]}-{'le' if c[1] else 'lt'}-{c[2]}-{c[4]}-bs{c[5]}"
)
@pytest.mark.parametrize("kernel_mean", [False, True], ids=["z-given", "z-in-kernel"])
def test_kernel_equals_smooth_group(case, kernel_mean):
    window, inclusive, divisor, first_too, layout, bs, hkv, hq, d, dtype = case
    g = torch.Generator().manual_seed(window + bs + hkv)
    cfg = KVSmoothConfig(
        lam_ref=0.6, clip=0.3, window=window, layers=(LAYER,), rank_inclusive=inclusive,
        rank_divisor=divisor, smooth_first_token=first_too,
    )  # fmt: skip
    nb, tokens, b = 30, 11, 7
    grp = _group(cfg, bs, b, g, nb, tokens)
    entropy = (torch.rand(tokens, hq, generator=g) * 3).to(DEVICE)
    z = entropy[grp.token].mean(-1)
    buf = _buffers(g, window, None if kernel_mean else z, grp)
    kv = allocate_kv_cache(layout, nb, bs, hkv, d, dtype, DEVICE)
    kv.copy_(torch.randn(kv.shape, generator=g).to(dtype))
    kv_want, buf_want, kv0 = kv.clone(), _clone(buf), kv.clone()
    kv_want0 = kv0.clone()

    io_want = SplitViews(*split_kv(kv_want, layout), grp.table)
    smooth_group(_call(buf_want, io_want), grp, z)
    k, v = split_kv(kv, layout)
    args = grp.launch_args()
    KU.smooth_rows(
        buf.queue, buf.count, LAYER, entropy if kernel_mean else z, grp.token, grp.slot, cur=grp.cur,
        positions=grp.positions, table=grp.table, k_cache=k, v_cache=v, z_given=not kernel_mean, **args,
    )  # fmt: skip

    assert torch.equal(buf.count, buf_want.count)
    if kernel_mean:  # the pushed entries: a head mean summed in another order
        torch.testing.assert_close(buf.queue, buf_want.queue, rtol=1e-6, atol=0)
    else:
        assert torch.equal(buf.queue, buf_want.queue)
    if dtype == torch.bfloat16 and TA.INTERPRETED:  # the interpreter casts fp32 to bf16 by truncation
        torch.testing.assert_close(kv, kv_want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(kv, kv_want)  # every slot, in the layout's own storage
    # nothing but the rows' token slots changed (the reference's footprint as well)
    blocks, offsets = grp.cur // bs, grp.cur % bs
    k0, v0 = split_kv(kv0, layout)
    k0[blocks, offsets], v0[blocks, offsets] = k[blocks, offsets], v[blocks, offsets]
    assert torch.equal(kv, kv0)
    assert not torch.equal(k[blocks, offsets], split_kv(kv_want0, layout)[0][blocks, offsets])


def _packed(g: torch.Generator, nb: int, bs: int, hkv: int, d: int) -> torch.Tensor:
    """vLLM's packed CPU pages (``vec`` ISA, fp32: plain page halves) filled through vLLM's op."""
    cache = torch.zeros(nb, hkv, bs, 2 * d)
    k, v = torch.randn(2, nb * bs, hkv, d, generator=g).unbind(0)
    write_kv(cache, k, v, torch.arange(nb * bs), "vec")
    return cache


@pytest.mark.skipif(DEVICE != "cpu", reason="vLLM's CPU cache op")
def test_cpu_pages_written_where_vllms_op_writes():
    """On CPU_ATTN's packed cache the engine's launch (through the kernel views) leaves the cache as
    :func:`smooth_group` does, whose write goes through vLLM's packing op."""
    g = torch.Generator().manual_seed(5)
    cfg = KVSmoothConfig(lam_ref=0.5, clip=0.4, window=6, layers=(LAYER,), smooth_first_token=False)
    nb, bs, hkv, d, tokens = 20, 16, 2, 32, 9
    grp = _group(cfg, bs, 5, g, nb, tokens)
    entropy = torch.rand(tokens, 4, generator=g) * 3
    buf = _buffers(g, cfg.window, None, grp)
    cache = _packed(g, nb, bs, hkv, d)
    cache_want, buf_want, cache0 = cache.clone(), _clone(buf), cache.clone()
    smooth_group(
        _call(buf_want, CPUPages(cache_want, grp.table, "vec", "auto")), grp, entropy[grp.token].mean(-1)
    )
    io = CPUPages(cache, grp.table, "vec", "auto")
    assert io.kernel_views() is not None
    assert smooth_group_kernel(_call(buf, io), grp, entropy)
    assert torch.equal(buf.count, buf_want.count)
    torch.testing.assert_close(buf.queue, buf_want.queue, rtol=1e-6, atol=0)
    assert torch.equal(cache, cache_want) and not torch.equal(cache, cache0)


def test_no_kernel_views_falls_back():
    """A call off the kernel path, and a cache the kernel cannot address (no kernel views), are left to
    the torch path untouched."""
    g = torch.Generator().manual_seed(6)
    cfg = KVSmoothConfig(lam_ref=0.5, window=4, layers=(LAYER,))
    grp = _group(cfg, 16, 3, g, 12, 5)
    buf = _buffers(g, 4, None, grp)
    io = SplitViews(*torch.randn(2, 12, 16, 1, 8, generator=g).unbind(0), grp.table)
    before = (buf.queue.clone(), buf.count.clone(), io.k_cache.clone())
    entropy = torch.rand(5, 2, generator=g)
    # the torch path (no step device tables: a composition's reworked rows on CPU) keeps torch's update
    assert not smooth_group_kernel(_call(buf, io, kernel_path=False), grp, entropy)
    io.kernel_views = lambda: None  # type: ignore[method-assign]
    assert not smooth_group_kernel(_call(buf, io), grp, entropy)
    assert torch.equal(buf.queue, before[0]) and torch.equal(buf.count, before[1])
    assert torch.equal(io.k_cache, before[2])


class _TwoRanks:
    """A tensor-parallel group of two ranks whose other rank holds the same heads (its all-reduce
    doubles the sum), counting its reductions."""

    world_size, rank_in_group, device = 2, 0, torch.device(DEVICE)

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def test_tensor_parallel_head_mean_is_reduced_before_the_launch(monkeypatch):
    """Under tensor parallelism the launch gets the all-reduced head mean (``z_given``), one reduction
    per group, and smooths as the torch path does with that mean."""
    from vllm_halluguard.engine import kvsmooth, tp

    group = _TwoRanks()
    monkeypatch.setattr(kvsmooth, "tp_group", lambda: group)
    monkeypatch.setattr(tp, "tp_group", lambda: group)
    g = torch.Generator().manual_seed(8)
    cfg = KVSmoothConfig(lam_ref=0.5, clip=0.4, window=5, layers=(LAYER,))
    grp = _group(cfg, 16, 4, g, 16, 6)
    entropy = (torch.rand(6, 4, generator=g) * 3).to(DEVICE)
    buf = _buffers(g, cfg.window, None, grp)
    k, v = (torch.randn(2, 16, 16, 2, 8, generator=g).to(DEVICE)).unbind(0)
    buf_want, k_want, v_want, k0 = _clone(buf), k.clone(), v.clone(), k.clone()
    z = (entropy[grp.token].sum(-1) * 2) / 8  # what head_mean makes of two such ranks
    smooth_group(_call(buf_want, SplitViews(k_want, v_want, grp.table)), grp, z)
    assert smooth_group_kernel(_call(buf, SplitViews(k, v, grp.table)), grp, entropy)
    assert group.calls == 1
    assert torch.equal(buf.queue, buf_want.queue) and torch.equal(buf.count, buf_want.count)
    assert torch.equal(k, k_want) and torch.equal(v, v_want) and not torch.equal(k, k0)


#: Compiles the kernel for sm_90 and prints which float instructions its PTX has (a fresh process:
#: an interpreted launch leaves ``triton.language`` patched for the interpreter).
_COMPILE_SM90 = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_halluguard.kernels import kvsmooth_update as KU
jit = KU._kvsmooth_update_kernel
pointers = dict.fromkeys(("queue_ptr", "ent_ptr"), "*fp32") | {"first_ptr": "*u8"}
pointers |= dict.fromkeys(("count_ptr", "tok_ptr", "slot_ptr", "cur_ptr", "pos_ptr", "table_ptr"), "*i64")
pointers |= dict.fromkeys(("k_ptr", "v_ptr"), "*bf16")
consts = {"PAGE": 16, "HQ_PAD": 32, "HKV": 8, "HKV_PAD": 8, "HEAD_SIZE": 128, "HEAD_PAD": 128, "M_PAD": 64}
names = jit.arg_names
scalar = lambda n: "constexpr" if n in consts else "fp32" if n in ("lo", "hi") else "i32"
sig = {n: pointers.get(n) or scalar(n) for n in names}
src = ASTSource(jit, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
options = KU._options(16, 8, 128, 32)
try:
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
        options={"num_warps": options["num_warps"], "enable_fp_fusion": options["enable_fp_fusion"]})
except (RuntimeError, FileNotFoundError) as err:
    print(json.dumps({"skip": str(err)}))
else:
    ptx = compiled.asm["ptx"]
    print(json.dumps({op: op in ptx for op in ("fma.rn.f32", "div.rn.f32", "cvt.rn.bf16.f32")}))
"""


def test_compiled_for_sm90_the_ema_rounds_as_torch():
    """Compiled for an H100 (sm_90, no GPU needed: Triton's frontend and the bundled ptxas), the kernel's
    float ops round as torch's separate ops: no fused multiply-add (Triton fuses by default), IEEE
    divisions, round-to-nearest bf16 stores. (Not run on a GPU.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parents[1]), env.get("PYTHONPATH")) if p
    )
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in got:  # no CUDA backend or ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {got['skip']}")
    assert got == {"fma.rn.f32": False, "div.rn.f32": True, "cvt.rn.bf16.f32": True}
