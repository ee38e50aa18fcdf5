"""scripts/build_vllm_attention.py: the built folder imports without vLLM and its kernel is right.

The folder is imported in a fresh ``python -I`` subprocess with the folder first on ``sys.path``;
every ``vllm`` module it loads must come from the folder. There, vLLM's own ``unified_attention``
runs in Triton's interpreter (CPU) on a tiny mixed batch, and its output is compared with the
project's dense reference: a cross-check of both kernels' contracts. Needs an installed vLLM to
copy from (skipped on the GPU machine, which has none).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_halluguard.kernels.reference import attention_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_vllm_attention as builder  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None

CHILD = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
folder, io = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
import torch
from vllm.v1.attention.ops.triton_unified_attention import unified_attention
foreign = [n for n, m in sys.modules.items()
           if n.split(".")[0] == "vllm" and not (getattr(m, "__file__", None) or folder).startswith(folder)]
assert not foreign, foreign
x = torch.load(io + "/in.pt")
out = torch.empty_like(x["q"])
unified_attention(q=x["q"], k=x["k"], v=x["v"], out=out, cu_seqlens_q=x["qsl"], max_seqlen_q=x["max_q"],
    seqused_k=x["seq_lens"], max_seqlen_k=x["max_k"], softmax_scale=x["scale"], causal=True,
    window_size=(-1, -1), block_table=x["table"], softcap=0, q_descale=None, k_descale=None,
    v_descale=None, sinks=x["sinks"])
torch.save(out, io + "/out.pt")
"""


@pytest.mark.skipif(not HAS_VLLM, reason="needs an installed vLLM to copy from")
def test_built_folder_runs_vllm_kernel_like_the_dense_reference(tmp_path):
    folder = tmp_path / "vllm-attn"
    copied = builder.build(builder.installed_vllm(), folder)
    assert copied == [builder.ENTRY, f"{builder.OPS}.triton_attention_helpers"]
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs, qlens, slens = 4, 2, 32, 16, [3, 1, 5], [40, 23, 5]
    kv = torch.randn(10, 2, bs, hkv, d, generator=g)  # vLLM Triton layout
    table = torch.randperm(10, generator=g)[:9].view(3, 3).to(torch.int32)
    q = torch.randn(sum(qlens), hq, d, generator=g)
    sinks = torch.randn(hq, generator=g)  # vLLM's per-head sinks
    inputs = {
        "q": q,
        "k": kv[:, 0],
        "v": kv[:, 1],
        "qsl": torch.tensor([0, 3, 4, 9], dtype=torch.int32),
        "seq_lens": torch.tensor(slens, dtype=torch.int32),
        "table": table,
        "max_q": max(qlens),
        "max_k": max(slens),
        "scale": d**-0.5,
        "sinks": sinks,
    }
    torch.save(inputs, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(folder), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    start = 0
    for b, (ql, sl) in enumerate(zip(qlens, slens, strict=True)):
        pages = table[b, : -(-sl // bs)].long()
        k = kv[pages, 0].flatten(0, 1)[:sl]
        v = kv[pages, 1].flatten(0, 1)[:sl]
        rows = slice(start, start + ql)
        want, _, _ = attention_rows(
            q[rows], k, v, d**-0.5, torch.arange(sl - ql, sl), sink=sinks[None, :].expand(ql, hq)
        )
        torch.testing.assert_close(got[rows], want, rtol=0, atol=1e-5)
        start += ql


def test_unknown_vllm_import_is_refused(tmp_path):
    fake = tmp_path / "vllm"
    (fake / "v1" / "attention" / "ops").mkdir(parents=True)
    (fake / "v1" / "kv_cache_interface.py").write_text("class KVQuantMode:\n    NONE = 0\n")
    (fake / "v1" / "attention" / "ops" / "triton_unified_attention.py").write_text(
        "from vllm.model_executor import something\n"
    )
    with pytest.raises(SystemExit, match=r"vllm\.model_executor"):
        builder.build(fake, tmp_path / "out")
