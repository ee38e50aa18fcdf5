"""``HALLUGUARD_VERIFY_NATIVE``: the plain rows of a mixed step against vLLM's whole-batch pass, exact only
where vLLM's kernel is batch-invariant (``execute.native_exact``), a warning only where a mismatch
cannot be vLLM's own batch-composition variance."""

import logging
from types import SimpleNamespace

import pytest
import torch
import vllm.envs as envs

from vllm_halluguard.engine import state
from vllm_halluguard.engine.execute import _verify_native, native_exact


@pytest.fixture
def vllm_env(monkeypatch):
    def set_(batch_invariant: bool, cpu_split_kv: bool) -> None:
        monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", batch_invariant, raising=False)
        monkeypatch.setattr(envs, "VLLM_CPU_ATTN_SPLIT_KV", cpu_split_kv, raising=False)

    return set_


def test_exact_only_in_vllms_batch_invariant_configurations(vllm_env, monkeypatch):
    vllm_env(batch_invariant=False, cpu_split_kv=False)
    assert native_exact("CPU_ATTN")  # no split of a row's keys: tested bit-identical on CPU
    assert not native_exact("FLASH_ATTN") and not native_exact("TRITON_ATTN")  # FA3 splits per batch
    vllm_env(batch_invariant=True, cpu_split_kv=True)
    assert native_exact("FLASH_ATTN") and native_exact("TRITON_ATTN")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not native_exact("CPU_ATTN")  # split KV on several threads depends on the batch
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert native_exact("CPU_ATTN")


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_mismatch_is_counted_and_warned_about_only_where_it_cannot_be_vllms_variance(
    vllm_env, caplog, batch_invariant
):
    vllm_env(batch_invariant=batch_invariant, cpu_split_kv=True)
    whole = torch.arange(12.0).view(3, 4)
    sub = whole.clone()
    sub[2, 1] += 1e-3  # row 2 of the sub-batch rounded differently

    def native(layer, q, k, v, cache, meta, out, *args, **kwargs):
        out.copy_(whole)  # the whole-batch pass

    runtime = SimpleNamespace(stats={"native_checked": 0, "native_mismatch": 0, "native_max_diff": 0.0})
    state.set_current(runtime)
    plan = SimpleNamespace(full=object(), query_start_loc=[0, 1, 2, 3])
    lp = SimpleNamespace(native=SimpleNamespace(rows=[0, 2]))
    try:
        with caplog.at_level(logging.WARNING, logger="vllm_halluguard.engine.execute"):
            _verify_native(SimpleNamespace(_hg_backend_name="FLASH_ATTN"), native, None, None, None, None,
                           None, plan, lp, sub, (), {})  # fmt: skip
    finally:
        state.set_current(None)
    assert runtime.stats["native_checked"] == 2 and runtime.stats["native_mismatch"] == 1
    assert runtime.stats["native_max_diff"] == pytest.approx(1e-3, rel=1e-3)
    warned = [r for r in caplog.records if "batch-invariant" in r.getMessage()]
    assert len(warned) == int(batch_invariant)
