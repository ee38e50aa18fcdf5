"""scripts/gpu_check.py, the GPU machine's check, in its CPU smoke mode (Triton's interpreter).

The GPU machine has torch and Triton but no vLLM, pydantic or pytest, so every run here happens in
a process whose import system refuses those three: what the script imports must not need them.
The checks: every stage writes its JSON line as it goes, a failing stage leaves the next ones
running, the FA3 stage drives an FA3-shaped interface and checks it against the reference, and the
watchdog ends a hung run with a ``timeout`` line inside the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCKED_RUN = textwrap.dedent(
    """
    import runpy, sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vllm", "pydantic", "pytest"):
                raise ImportError(f"refused on purpose: {name} (the GPU machine has none)")
            return None
    sys.meta_path.insert(0, Refuse())
    for mod in [m for m in sys.modules if m.split(".")[0] in ("vllm", "pydantic", "pytest")]:
        del sys.modules[mod]
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)
#: An FA3-shaped module (the upstream hopper interface's paged call) computing the torch reference.
FAKE_FA3 = textwrap.dedent(
    """
    from vllm_halluguard.kernels.paged import paged_attention_ref

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, page_table=None,
                                cu_seqlens_q=None, max_seqlen_q=None, softmax_scale=None, causal=False):
        assert causal and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        ref = paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, page_table, softmax_scale)
        return ref[0]
    """
)


def run_check(tmp: Path, *args: str, extra_path: str | None = None) -> tuple[int, list[dict[str, Any]], str]:
    out = tmp / "out"
    blocker = tmp / "blocked_run.py"
    blocker.write_text(BLOCKED_RUN)
    path = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
    env = {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(blocker), str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)]
    res = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    lines_file = out / "gpu_check.jsonl"
    lines = [json.loads(x) for x in lines_file.read_text().splitlines()] if lines_file.exists() else []
    return res.returncode, lines, res.stdout[-3000:] + res.stderr[-3000:]


def by_stage(lines: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [x for x in lines if x["stage"] == stage]


def test_smoke_writes_every_stage_without_vllm_pydantic_or_pytest(tmp_path):
    rc, lines, log = run_check(tmp_path, "--budget-s", "400")
    assert rc == 0, log
    env = by_stage(lines, "env")
    assert env[0]["status"] == "ok", env
    assert env[0]["imported_vllm_or_pydantic"] == {"vllm": False, "pydantic": False}
    correct = by_stage(lines, "correctness")
    assert {x["layout"] for x in correct} == {"flash", "triton", "hnd2d", "hnd2d-nhd"}
    assert all(x["status"] == "ok" and x["pass"] for x in correct), correct
    for x in correct:  # every variant ran and stayed within the bf16 tolerance
        assert set(x["variants"]) == {"plain", "sinks+mask+stats", "split3+sinks+mask", "stats-only+mask"}
        assert all(0.0 <= v["max_err"]["lse"] < 1e-4 for v in x["variants"].values())
    bench = by_stage(lines, "bench")
    assert len(bench) == 2 and all(x["status"] == "ok" and x["layout"] == "hnd2d-nhd" for x in bench)
    for x in bench:
        assert set(x["ms"]) == {"plain", "sinks+stats", "+mask", "stats only", "sdpa"}, x
        assert x["max_err_plain"] < 2e-2
    fa3 = by_stage(lines, "fa3")
    assert fa3[0]["status"] == "skip" and "flash_attn_interface" in fa3[0]["reason"]
    assert lines[-1]["stage"] == "summary" and lines[-1]["status"] == "ok"
    assert (tmp_path / "out" / "gpu_check.md").read_text().count("| bench |") == 2


def test_a_failing_stage_does_not_stop_the_next_and_fa3_is_checked(tmp_path):
    fake = tmp_path / "fa3"
    fake.mkdir()
    (fake / "flash_attn_interface.py").write_text(FAKE_FA3)
    rc, lines, log = run_check(
        tmp_path, "--stages", "correctness", "fa3", "--fail-stage", "correctness", extra_path=str(fake)
    )
    assert rc == 1, log  # the run reports the failure ...
    failed = by_stage(lines, "correctness")
    assert len(failed) == 1 and failed[0]["status"] == "error" and "deliberate" in failed[0]["error"]
    fa3 = by_stage(lines, "fa3")  # ... and the stage after it still ran
    assert len(fa3) == 2 and all(x["status"] == "ok" for x in fa3), fa3
    for x in fa3:
        assert x["source"] == "flash_attn_interface" and x["fa3_pass"] and x["max_err_fa3"] < 2e-2
        assert set(x["ms"]) == {"fa3", "plain"}
    assert lines[-1]["stage"] == "summary" and lines[-1]["status"] == "fail"


def test_the_watchdog_ends_a_hung_stage(tmp_path):
    rc, lines, log = run_check(
        tmp_path, "--budget-s", "4", "--grace-s", "2", "--reserve-s", "0", "--stall-stage", "env"
    )
    assert rc == 3, log
    assert [x["stage"] for x in lines] == ["watchdog"] and lines[0]["status"] == "timeout"


def test_the_timed_views_are_vllms_own_per_layer_views(monkeypatch):
    """ "hnd2d" / "hnd2d-nhd" in the check have the shape and strides of vLLM 0.32's
    ``create_kv_cache_views`` for its LBHNC / LBNHC layouts (LBNHC: what FLASH_ATTN and TRITON_ATTN
    get, neither declaring a layout), and the kernel's K/V halves are the impls' split of it."""
    import importlib.util

    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec_ = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec_ is not None and spec_.loader is not None
    gpu_check = importlib.util.module_from_spec(spec_)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec_.loader.exec_module(gpu_check)
    nb, bs, hkv, d = 5, 16, 3, 8
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=d, dtype=torch.bfloat16)
    for case, physical in (("hnd2d", KVCacheLayout.LBHNC), ("hnd2d-nhd", KVCacheLayout.LBNHC)):
        raw = torch.zeros(spec.page_size_bytes * nb, dtype=torch.int8)
        tensor = KVCacheTensor(
            size=raw.numel(), layers=["l0"], layer_stride=raw.numel(), block_stride=spec.page_size_bytes
        )
        (view,) = create_kv_cache_views(raw, spec, nb, physical, tensor)
        cache, k_cache, v_cache = gpu_check.kv_cache(case, nb, bs, hkv, d, torch.bfloat16, "cpu")
        assert cache.shape == view.shape and cache.stride() == view.stride(), case
        vk, vv = view.transpose(1, 2).split(d, dim=-1)  # as vLLM's FLASH_ATTN / TRITON_ATTN impls
        assert (k_cache.shape, k_cache.stride()) == (vk.shape, vk.stride()), case
        assert (v_cache.shape, v_cache.stride()) == (vv.shape, vv.stride()), case
