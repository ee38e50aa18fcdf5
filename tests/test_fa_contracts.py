"""The FlashAttention stand-ins of the GPU-backend test mode (``tests/helpers/fa_ops.py``): they compute
paged attention (with FA3's per-head sink) as a dense softmax does, and refuse what the real ops refuse.
And the engine hands FA3 its sinks in the one dtype ``mha_fwd`` takes (finding 2 of issue 26)."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import fa_ops
from vllm_halluguard.engine.execute import native_sinks

H, HK, D, PAGE = 4, 2, 16, 16


def _batch(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    lens_q, lens_k = [3, 1], [20, 7]
    q = torch.randn(sum(lens_q), H, D, dtype=dtype)
    k = torch.randn(6, PAGE, HK, D, dtype=dtype)
    v = torch.randn(6, PAGE, HK, D, dtype=dtype)
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
    cu_q = torch.tensor([0, 3, 4], dtype=torch.int32)
    used = torch.tensor(lens_k, dtype=torch.int32)
    return q, k, v, table, cu_q, used, lens_q, lens_k


def _fa3(q, k, v, table, cu_q, used, s_aux=None, out=None, meta=None):
    return fa_ops.fa3_fwd(
        q,
        k,
        v,
        None,
        None,
        None,
        out,
        cu_q,
        None,
        None,
        None,
        used,
        3,
        20,
        table,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        D**-0.5,
        True,
        -1,
        -1,
        0.0,
        True,
        meta,
        0,
        None,
        0,
        s_aux,
        1,
        0,
        None,
    )


def test_fa3_stand_in_is_dense_attention_with_a_sink() -> None:
    q, k, v, table, cu_q, used, lens_q, lens_k = _batch()
    sinks = torch.randn(H).to(torch.bfloat16)
    out, lse, _, _ = _fa3(q, k, v, table, cu_q, used, s_aux=sinks)
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k, strict=True)):
        keys = k[table[b].long()].reshape(-1, HK, D)[:nk].repeat_interleave(H // HK, 1)
        vals = v[table[b].long()].reshape(-1, HK, D)[:nk].repeat_interleave(H // HK, 1)
        for i in range(nq):
            row = int(cu_q[b]) + i
            pos = nk - nq + i
            s = torch.einsum("hd,khd->hk", q[row], keys[: pos + 1]) * D**-0.5
            s = torch.cat([s, sinks.float()[:, None]], dim=1)
            p = torch.softmax(s, dim=1)[:, :-1]
            torch.testing.assert_close(out[row], torch.einsum("hk,khd->hd", p, vals[: pos + 1]))
            torch.testing.assert_close(lse[:, row], torch.logsumexp(s, dim=1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"s_aux": torch.zeros(H)}, "bf16 dtype for S aux"),  # fp32 sinks: what FarSight B handed FA3
        ({"s_aux": torch.zeros(H + 1, dtype=torch.bfloat16)}, "s_aux must have shape"),
        (
            {"table": torch.tensor([[4, 1], [2, 0]], dtype=torch.int64)},
            "page_table must have dtype torch.int32",
        ),
        ({"used": torch.tensor([20, 7], dtype=torch.int64)}, "seqused_k must have dtype int32"),
        ({"out": torch.empty(4, H, D, dtype=torch.float64)}, "output must have the same dtype"),
        ({"q": torch.randn(8, H, 2)[:4, :, :1].expand(4, H, D)}, "contiguous last dimension"),
    ],
)
def test_fa3_stand_in_refuses_what_mha_fwd_refuses(change, message) -> None:
    q, k, v, table, cu_q, used, _, _ = _batch()
    args = {"q": q, "table": table, "used": used, "s_aux": None, "out": None, **change}
    with pytest.raises(fa_ops.ContractError, match=message):
        _fa3(args["q"], k, v, args["table"], cu_q, args["used"], s_aux=args["s_aux"], out=args["out"])


def test_fa3_sinks_need_sm90_and_at_most_64_heads() -> None:
    q, k, v, table, cu_q, used, _, _ = _batch()
    fa_ops.install(arch=lambda: 80)
    try:
        with pytest.raises(fa_ops.ContractError, match="only supported for Hopper"):
            _fa3(q, k, v, table, cu_q, used, s_aux=torch.zeros(H, dtype=torch.bfloat16))
    finally:
        fa_ops.install(arch=lambda: 90)
    wide = torch.randn(4, 72, D)
    with pytest.raises(fa_ops.ContractError, match="query heads <= 64"):
        _fa3(wide, k, v, table, cu_q, used, s_aux=torch.zeros(72, dtype=torch.bfloat16))


def test_fa3_refuses_a_schedule_made_for_another_batch() -> None:
    q, k, v, table, cu_q, used, _, _ = _batch()
    meta = fa_ops.fa3_get_scheduler_metadata(
        2,
        3,
        20,
        H,
        HK,
        D,
        D,
        torch.float32,
        used,
        cu_q,
        None,
        None,
        None,
        None,
        PAGE,
        0,
        True,
        -1,
        -1,
        False,
        0,
        None,
        0,
    )
    _fa3(q, k, v, table, cu_q, used, meta=meta)  # its own batch: accepted
    other = torch.tensor([19, 7], dtype=torch.int32)
    with pytest.raises(fa_ops.ContractError, match="schedule made for"):
        _fa3(q, k, v, table, cu_q, other, meta=meta)


def test_fa2_takes_no_fp32_without_the_relaxation_and_needs_16_token_pages() -> None:
    q, k, v, table, cu_q, used, _, _ = _batch()
    zero = torch.zeros(3, dtype=torch.int32)
    args = (
        cu_q,
        zero,
        used,
        None,
        table,
        None,
        3,
        20,
        0.0,
        D**-0.5,
        False,
        True,
        -1,
        -1,
        0.0,
        False,
        0,
        None,
    )
    fa_ops.fa2_varlen_fwd(q, k, v, None, *args)
    fa_ops.RELAX_FP32 = False
    try:
        with pytest.raises(fa_ops.ContractError, match="fp16, bf16"):
            fa_ops.fa2_varlen_fwd(q, k, v, None, *args)
    finally:
        fa_ops.RELAX_FP32 = True
    with pytest.raises(fa_ops.ContractError, match="divisible by 16"):
        fa_ops.fa2_varlen_fwd(q, k[:, :8], v[:, :8], None, *args)


def test_cache_write_stand_in_fills_the_slots_and_skips_padding() -> None:
    key, value = torch.randn(5, HK, D), torch.randn(5, HK, D)
    cache = torch.zeros(3, HK, PAGE, 2 * D)  # vLLM's [blocks, heads, block_size, 2 * head_size]
    kc, vc = cache.transpose(1, 2).split(D, dim=-1)
    slots = torch.tensor([17, 0, -1, 40], dtype=torch.int64)  # 4 tokens (key is padded to 5)
    fa_ops.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", torch.ones(()), torch.ones(()))
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kc[slot // PAGE, slot % PAGE], key[t])
            assert torch.equal(vc[slot // PAGE, slot % PAGE], value[t])
    assert int((cache != 0).any(-1).sum()) == 3 * HK
    with pytest.raises(fa_ops.ContractError, match="int64"):
        fa_ops.reshape_and_cache_flash(
            key, value, kc, vc, slots.int(), "auto", torch.ones(()), torch.ones(())
        )


@pytest.mark.parametrize(
    ("version", "dtype"), [(3, torch.bfloat16), (2, torch.float32), (None, torch.float32)]
)
def test_native_sinks_take_the_dtype_of_the_backend(version, dtype) -> None:
    impl = types.SimpleNamespace(vllm_flash_attn_version=version)
    sinks = native_sinks(impl, torch.linspace(-3, 1, H))
    assert sinks.dtype == dtype and sinks.is_contiguous() and sinks.shape == (H,)


@pytest.mark.parametrize("model_sinks", [None, torch.zeros(H)])
def test_a_sink_lane_hands_fa3_its_sinks_within_mha_fwds_contract(model_sinks) -> None:
    """``execute._native_sub`` (the sink lane's native call) on an FA3 impl: the native call sees bf16
    sinks (FarSight's, combined with the model's own where it has them), FA3's stand-in accepts them,
    and the impl gets its own sinks back afterwards."""
    from vllm_halluguard.engine.execute import _native_sub

    q, k, v, table, cu_q, used, *_ = _batch()
    impl = types.SimpleNamespace(vllm_flash_attn_version=3, sinks=model_sinks)
    seen = []

    def native(layer, q_, k_, v_, cache, meta, out, *args, **kwargs):
        seen.append(impl.sinks.dtype)
        out.copy_(_fa3(q_, k, v, table, cu_q, used, s_aux=impl.sinks)[0])

    output = torch.zeros_like(q)
    sub = types.SimpleNamespace(tokens=slice(0, q.shape[0]), meta=None, num_tokens=q.shape[0])
    farsight = torch.linspace(-3, 1, H)  # fp32, as FarSight's sink logits are made
    _native_sub(impl, native, None, q, None, None, k, sub, output, farsight, (), {})
    assert seen == [torch.bfloat16] and impl.sinks is model_sinks
    assert output.abs().sum() > 0


@pytest.mark.parametrize(("heads", "lane"), [(64, True), (65, False), (128, False)])
def test_farsight_b_leaves_fa3s_sink_lane_above_64_query_heads_per_rank(monkeypatch, heads, lane) -> None:
    """vLLM's FLASH_ATTN builder, wrapped, with FA3's sinks: a mitigated step's plan hands FarSight mode B
    the native sink lane only for at most 64 query heads per rank (``mha_fwd`` refuses ``s_aux`` above,
    the stand-in's "query heads <= 64" check); above, its rows are reworked (the project's kernel on a
    GPU), as on a backend without sinks."""
    from vllm.v1.attention.backends import flash_attn

    from vllm_halluguard.engine import plan, state
    from vllm_halluguard.engine.backends import wrap
    from vllm_halluguard.engine.base import RowSpan
    from vllm_halluguard.engine.farsight import FarSightEngine
    from vllm_halluguard.engine.state import RequestState, Row, StepView
    from vllm_halluguard.methods import FarSightConfig

    monkeypatch.setattr(flash_attn, "is_flash_attn_varlen_func_available", lambda: True)  # as on CUDA
    monkeypatch.setattr(flash_attn, "flash_attn_supports_sinks", lambda: True, raising=False)  # FA3
    builder_cls = wrap(flash_attn.FlashAttentionBackend, "FLASH_ATTN").get_builder_cls()
    builder = object.__new__(builder_cls)
    builder._hg_decoder, builder._hg_kernel, builder._hg_num_heads = True, True, heads
    seen = []
    monkeypatch.setattr(plan, "build_plan", lambda build, prefix, cm, view, backend, *a: seen.append(backend))
    row = Row(0, RequestState("b", 0, FarSightConfig(mode="B"), 5))
    runtime = types.SimpleNamespace(num_layers=2, stats={})
    runtime.view_for = lambda n: StepView(1, (row,))
    cm = types.SimpleNamespace(num_reqs=1, causal=True)
    try:
        state.set_current(runtime)
        builder.build(0, cm)
    finally:
        state.set_current(None)
    (backend,) = seen
    assert backend.native_sinks is lane and backend.num_heads == heads
    route = FarSightEngine().route(row, RowSpan(0, 1, 9), backend)
    assert (route.sinks is not None) is lane and bool(route.rework) is not lane
