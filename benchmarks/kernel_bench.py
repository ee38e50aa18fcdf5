"""GPU timings of the paged attention kernel at LLaVA-1.5-7B shapes, as ratios measured in one run.

For each decode shape (``batch`` sequences, one new row each, ``ctx`` keys) and prefill shape
(``batch`` prompts of ``len`` rows, causal from position 0) it times, with ``triton.testing.do_bench``
(median, L2 flushed between runs):

* ``plain``: :func:`paged_attention_into` without sinks or statistics, automatic split-KV (the
  baseline of the ratios);
* ``no-split`` / ``split-N`` (decode): the same with ``num_splits=1`` / ``N`` (``--splits``);
* ``sinks+stats``: per-row sinks (half ``-inf``) and LSE + entropy output (FarSight + KVSmooth);
* ``+mask``: the same plus a key mask dropping ~25% of keys at random (PruneHal);
* ``+span mask`` / ``span noskip``: a mask dropping the middle half of the keys in one span (whole
  tiles, like pruned image tokens), with and without skipping all-masked tiles;
* ``stats only``: the K-only LSE + entropy pass (:func:`paged_attention_stats`, no V read);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on K/V already gathered into
  dense ``[B, H, S, D]`` tensors (a dense-kernel yardstick, gather not counted);
* ``gather+sdpa``: gathering K/V through the block table, then SDPA (what a torch path costs);
* ``vllm-2d`` / ``vllm-3d`` (with ``--vllm-path``): vLLM's unmodified ``unified_attention``
  (``kernel_unified_attention``; 3D = split-KV segments, decode only), imported from that path.

Ratios are ``time / plain`` (below 1 = faster than our plain kernel), all measured in one run.
``max abs diff`` is the largest difference between our plain output and SDPA's. ``--heads`` takes
one or more ``Hq/Hkv`` configurations (default MHA 32/32 and GQA 28/4), one table each. Needs CUDA
(on a CPU it says so and exits 2); no vLLM needed: build a folder with
``scripts/build_vllm_attention.py`` where vLLM is installed and pass it as ``--vllm-path``.

    python benchmarks/kernel_bench.py
    python benchmarks/kernel_bench.py --dtype bf16 --decode-batch 1 64 --context 2000 --json out.json
    python benchmarks/kernel_bench.py --vllm-path build/vllm-attn   # adds vLLM's kernel
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEVICE = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Shape:
    phase: str  # "decode" or "prefill"
    batch: int
    q_len: int  # rows per sequence
    seq_len: int  # keys per sequence


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scale: float
    sinks: torch.Tensor
    key_mask: torch.Tensor


def make_inputs(shape: Shape, args: argparse.Namespace) -> Inputs:
    from vllm_halluguard.kernels.layouts import allocate_kv_cache, split_kv

    dev, dtype = DEVICE, DTYPES[args.dtype]
    b, s, bs = shape.batch, shape.seq_len, args.block_size
    g = torch.Generator(device=dev).manual_seed(0)
    blocks_per_seq = -(-s // bs)
    num_blocks = b * blocks_per_seq + 1
    # K and V are strided views of one cache in vLLM's Triton or FlashAttention layout.
    cache = allocate_kv_cache(args.layout, num_blocks, bs, args.kv_heads, args.head_size, dtype, dev)
    cache.normal_(generator=g)
    k_cache, v_cache = split_kv(cache, args.layout)
    perm = torch.randperm(num_blocks, generator=g, device=dev)[: b * blocks_per_seq]
    block_table = perm.view(b, blocks_per_seq).to(torch.int32)
    t = b * shape.q_len
    q = torch.randn(t, args.num_heads, args.head_size, generator=g, device=dev, dtype=dtype)
    query_start_loc = torch.arange(0, t + 1, shape.q_len, device=dev, dtype=torch.int32)
    seq_lens = torch.full((b,), s, device=dev, dtype=torch.int32)
    sinks = torch.randn(t, args.num_heads, generator=g, device=dev)
    sinks[torch.rand(t, args.num_heads, generator=g, device=dev) < 0.5] = float("-inf")
    key_mask = torch.rand(b, blocks_per_seq * bs, generator=g, device=dev) > 0.25
    key_mask[:, 0] = True
    return Inputs(
        q,
        k_cache,
        v_cache,
        query_start_loc,
        seq_lens,
        block_table,
        args.head_size**-0.5,
        sinks,
        key_mask,
    )


def gather_dense(x: Inputs, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as ``[B, Hq, S, D]`` (KV heads repeated for GQA), gathered through the block table."""
    s = shape.seq_len
    group = x.q.shape[1] // x.k_cache.shape[2]

    def one(cache: torch.Tensor) -> torch.Tensor:
        dense = cache[x.block_table.long()].flatten(1, 2)[:, :s]  # [B, S, Hkv, D]
        return dense.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()

    return one(x.k_cache), one(x.v_cache)


def sdpa(x: Inputs, shape: Shape, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q = x.q.view(shape.batch, shape.q_len, *x.q.shape[1:]).transpose(1, 2)
    causal = shape.q_len > 1  # prefill rows start at position 0; a decode row sees every key
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=x.scale)
    return out.transpose(1, 2).reshape(x.q.shape)


def load_vllm(path: str) -> Callable[..., Any] | None:
    """vLLM's ``unified_attention`` from ``path`` (a checkout or site-packages dir), or None."""
    sys.path.insert(0, str(Path(path).expanduser().resolve()))
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as exc:
        print(f"note: vLLM's unified_attention not importable from {path}: {exc!r}; skipping it")
        return None
    return unified_attention


def vllm_call(fn: Callable[..., Any], x: Inputs, shape: Shape, out: torch.Tensor, split: bool) -> Callable:
    extra: dict[str, Any] = {}
    if split:  # the 3D (split-KV) decode path: scratch buffers as vLLM's builder allocates them
        segments, hq, pad = 16, x.q.shape[1], 1 << (x.q.shape[2] - 1).bit_length()
        t = x.q.shape[0]
        extra = {
            "seq_threshold_3D": shape.batch,
            "num_par_softmax_segments": segments,
            "softmax_segm_output": torch.empty(t, hq, segments, pad, device=DEVICE),
            "softmax_segm_max": torch.empty(t, hq, segments, device=DEVICE),
            "softmax_segm_expsum": torch.empty(t, hq, segments, device=DEVICE),
        }
    return lambda: fn(
        q=x.q,
        k=x.k_cache,
        v=x.v_cache,
        out=out,
        cu_seqlens_q=x.query_start_loc,
        max_seqlen_q=shape.q_len,
        seqused_k=x.seq_lens,
        max_seqlen_k=shape.seq_len,
        softmax_scale=x.scale,
        causal=True,
        window_size=(-1, -1),
        block_table=x.block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
        **extra,
    )


def bench_shape(shape: Shape, args: argparse.Namespace, vllm_fn: Callable[..., Any] | None) -> dict[str, Any]:
    import triton.testing

    from vllm_halluguard.kernels.triton_attention import paged_attention_into

    x = make_inputs(shape, args)
    out = torch.empty_like(x.q)
    lse = torch.empty(x.q.shape[:2], device=DEVICE)
    ent = torch.empty_like(lse)
    common = (x.q, x.k_cache, x.v_cache, x.query_start_loc, x.seq_lens, x.block_table, x.scale)
    stats_args = (x.q, x.k_cache, None, *common[3:])
    launch: dict[str, Any] = {
        "block_m": args.block_m,
        "tile_n": args.tile_n,
        "num_warps": args.num_warps,
        "num_stages": args.num_stages,
        "max_seq_len": shape.seq_len,
    }
    span = x.key_mask.clone()
    span[:] = True
    span[:, shape.seq_len // 4 : 3 * shape.seq_len // 4] = False
    k_dense, v_dense = gather_dense(x, shape)

    calls: dict[str, Callable[[], Any]] = {
        "plain": lambda: paged_attention_into(out, None, None, *common, **launch),
        "sinks+stats": lambda: paged_attention_into(out, lse, ent, *common, x.sinks, **launch),
        "+mask": lambda: paged_attention_into(out, lse, ent, *common, x.sinks, x.key_mask, **launch),
        "+span mask": lambda: paged_attention_into(out, lse, ent, *common, x.sinks, span, **launch),
        "span noskip": lambda: paged_attention_into(
            out, lse, ent, *common, x.sinks, span, skip_masked_tiles=False, **launch
        ),
        "stats only": lambda: paged_attention_into(None, lse, ent, *stats_args, **launch),
        "sdpa": lambda: sdpa(x, shape, k_dense, v_dense),
        "gather+sdpa": lambda: sdpa(x, shape, *gather_dense(x, shape)),
    }
    if shape.phase == "decode":
        calls["no-split"] = lambda: paged_attention_into(
            out, None, None, *common, **launch | {"num_splits": 1}
        )
        calls[f"split-{args.splits}"] = lambda: paged_attention_into(
            out, None, None, *common, **launch | {"num_splits": args.splits}
        )
    if vllm_fn is not None:
        vllm_out = torch.empty_like(x.q)
        calls["vllm-2d"] = vllm_call(vllm_fn, x, shape, vllm_out, split=False)
        if shape.phase == "decode":
            calls["vllm-3d"] = vllm_call(vllm_fn, x, shape, vllm_out, split=True)

    calls["plain"]()
    max_diff = (out.float() - sdpa(x, shape, k_dense, v_dense).float()).abs().max().item()
    times = {}
    for name, fn in calls.items():
        if args.smoke:  # CPU interpreter: one call each, nothing timed
            fn()
            times[name] = 1.0
            continue
        try:
            times[name] = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        except Exception as exc:  # e.g. a vLLM version with another signature, or out of memory
            print(f"note: {name} failed at {shape}: {exc!r}")
    kv_bytes = 2 * shape.batch * shape.seq_len * x.k_cache.shape[2] * x.k_cache.shape[3]
    kv_bytes *= x.q.element_size()
    return {"shape": vars(shape), "ms": times, "max_diff_vs_sdpa": max_diff, "kv_bytes": kv_bytes}


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["ms"] if n != "plain"))
    head = [
        "phase",
        "batch",
        "q_len",
        "ctx",
        "plain ms",
        "plain GB/s",
        *[f"{n} ×" for n in names],
        "max abs diff",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, ms = r["shape"], r["ms"]
        base = ms.get("plain", float("nan"))
        cells = [s["phase"], s["batch"], s["q_len"], s["seq_len"], f"{base:.4f}"]
        cells.append(f"{r['kv_bytes'] / base / 1e6:.0f}")
        cells += [f"{ms[n] / base:.2f}" if n in ms else "-" for n in names]
        cells.append(f"{r['max_diff_vs_sdpa']:.1e}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--heads", nargs="*", default=["32/32", "28/4"], help="Hq/Hkv configurations")
    p.add_argument(
        "--layout",
        choices=["triton", "flash", "hnd2d"],
        default="triton",
        help="KV cache layout (hnd2d: vLLM 0.32's per-layer view; scripts/gpu_check.py also times it)",
    )
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, nargs="*", default=[600, 2000], help="decode keys per sequence")
    p.add_argument(
        "--prefill", nargs="*", default=["1x600", "1x2000", "4x1200", "8x600"], help="BATCHxLEN prompts"
    )
    p.add_argument("--block-m", type=int, default=None, help="override rows per program (power of 2)")
    p.add_argument("--tile-n", type=int, default=None, help="override keys per step (power of 2)")
    p.add_argument("--num-warps", type=int, default=None, help="override warps per program")
    p.add_argument("--num-stages", type=int, default=None, help="override software pipelining depth")
    p.add_argument("--splits", type=int, default=8, help="the forced split count of the split-N column")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--vllm-path", default=None, help="directory holding a `vllm` package to compare with")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU: run every call once at a tiny shape in Triton's interpreter",
    )
    return p.parse_args(argv)


def smoke(args: argparse.Namespace) -> int:
    """Every timed call once, on CPU in Triton's interpreter, at tiny shapes (checks the calls only)."""
    global DEVICE
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is first imported
    DEVICE = "cpu"
    args.head_size, args.block_size, args.splits = 32, 16, 3
    vllm_fn = load_vllm(args.vllm_path) if args.vllm_path else None
    for heads in ("4/4", "6/2"):
        args.num_heads, args.kv_heads = (int(v) for v in heads.split("/"))
        for shape in (Shape("decode", 2, 1, 40), Shape("prefill", 1, 24, 24)):
            row = bench_shape(shape, args, vllm_fn)
            names = ", ".join(row["ms"])
            print(f"smoke {heads} {shape.phase}: {names}; max diff vs sdpa {row['max_diff_vs_sdpa']:.1e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        print("kernel_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed.")
        return 2
    import triton

    vllm_fn = load_vllm(args.vllm_path) if args.vllm_path else None
    shapes = [Shape("decode", b, 1, c) for c in args.context for b in args.decode_batch]
    for spec in args.prefill:
        b, n = (int(v) for v in spec.lower().split("x"))
        shapes.append(Shape("prefill", b, n, n))
    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    tables = {}
    for heads in args.heads:
        args.num_heads, args.kv_heads = (int(v) for v in heads.split("/"))
        rows = []
        for shape in shapes:
            rows.append(bench_shape(shape, args, vllm_fn))
            torch.cuda.empty_cache()  # the shape's tensors died with bench_shape
            print(f"done {heads} {shape}", file=sys.stderr, flush=True)
        print(
            f"## paged_attention on {device} — {args.dtype}, Hq/Hkv={heads}, D={args.head_size}, "
            f"block={args.block_size}, {args.layout} cache; {versions}\n"
        )
        print(markdown(rows) + "\n", flush=True)
        tables[heads] = rows
    if args.json:
        meta = {"device": device, "host": platform.node(), "torch": torch.__version__}
        meta |= {"triton": triton.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "tables": tables}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
