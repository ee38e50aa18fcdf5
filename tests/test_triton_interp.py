"""helpers.triton_interp: Triton's interpreter with the cheaper device-function call computes exactly
what the original does and leaves ``triton.language`` patched exactly as the original leaves it,
with fewer module walks (the V2 test mode and the GPU-backend helper use it)."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from helpers import triton_interp
from test_kernels import make_batch, make_sinks, run_triton


@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _row_stats_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Per row: max, sum of exp(x - max) and the number of blocks (``tl.cdiv``), through device calls."""
    row = tl.program_id(0)
    m = tl.full([1], float("-inf"), tl.float32)
    for i in tl.range(0, tl.cdiv(n, BLOCK)):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n + offs, mask=offs < n, other=float("-inf"))
        m = tl.maximum(m, tl.max(x, axis=0))
    total = tl.zeros([1], tl.float32)
    for i in tl.range(0, tl.cdiv(n, BLOCK)):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n + offs, mask=offs < n, other=float("-inf"))
        total += tl.sum(tl.exp(_scaled(x, 1.0) - m), axis=0)
    tl.store(out_ptr + row * 3 + tl.arange(0, 1), m)
    tl.store(out_ptr + row * 3 + 1 + tl.arange(0, 1), total)
    blocks = tl.cdiv(n, BLOCK).to(tl.float32) + tl.zeros([1], tl.float32)
    tl.store(out_ptr + row * 3 + 2 + tl.arange(0, 1), blocks)


def _row_stats(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], 3)
    _row_stats_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=64)
    return out


def _lang_state() -> dict[tuple[str, str], bool]:
    """Which attributes of the ``triton.language`` modules are (unwrapped) builtins right now."""
    mods = {"tl": tl, "core": tl.core, "math": tl.math, "tensor": tl.tensor}
    return {(m, n): tl.core.is_builtin(v) for m, mod in mods.items() for n, v in inspect.getmembers(mod)}


def _run(fn, cheap: bool):
    """``fn()`` with or without the cheap device call; its result, the module state after it, and
    how many module walks (``_patch_builtin``) it took."""
    walks = [0]
    walk = interpreter._patch_builtin

    def counting(*args, **kwargs):
        walks[0] += 1
        return walk(*args, **kwargs)

    was = triton_interp.installed()
    (triton_interp.install if cheap else triton_interp.uninstall)()
    interpreter._patch_builtin = counting
    try:
        result = fn()
    finally:
        interpreter._patch_builtin = walk
        (triton_interp.install if was else triton_interp.uninstall)()
    return result, _lang_state(), walks[0]


def _attention():
    batch = make_batch(32, 16, shapes=((1, 40), (5, 21), (3, 3)))
    return run_triton(batch, sinks=make_sinks(batch), num_splits=2)


@pytest.mark.parametrize("kernel", ["row_stats", "paged_attention"])
def test_cheap_device_calls_compute_the_same_with_fewer_module_walks(kernel):
    x = torch.randn(5, 150, generator=torch.Generator().manual_seed(0))
    fn = (lambda: _row_stats(x)) if kernel == "row_stats" else _attention
    want, state_want, walks_want = _run(fn, cheap=False)
    got, state_got, walks_got = _run(fn, cheap=True)
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(want), leaves(got), strict=True):  # bit for bit
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    assert state_got == state_want, "the launch must leave triton.language as the original does"
    assert walks_got < walks_want / 2, (walks_got, walks_want)
    if kernel == "row_stats":  # and it is the interpreted kernel, not a different computation
        ref = torch.stack([x.max(1).values, (x - x.max(1, keepdim=True).values).exp().sum(1)], 1)
        torch.testing.assert_close(got[:, :2], ref)
        assert torch.equal(got[:, 2], torch.full((5,), 3.0))


def test_install_is_undone_by_uninstall():
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    was = triton_interp.installed()
    triton_interp.uninstall()
    try:
        base = interpreter._patch_lang, interpreter.GridExecutor.__call__
        triton_interp.install()
        assert interpreter._patch_lang is not base[0] and triton_interp.installed()
        triton_interp.install()  # idempotent
        triton_interp.uninstall()
        assert (interpreter._patch_lang, interpreter.GridExecutor.__call__) == base
    finally:
        (triton_interp.install if was else triton_interp.uninstall)()
    assert triton_interp.installed() == was  # the session's state (conftest installs it) is back
    if not was:
        assert (interpreter._patch_lang, interpreter.GridExecutor.__call__) == (patch_lang, launch)
