"""The project's GPU check: kernel correctness, kernel timings and FA3, in one budgeted run.

Written for the lent GPU machine as it is (torch, Triton, numpy; no vLLM, no pydantic, no pytest, no
network), and run on CPU by the tests in a tiny ``--smoke`` mode under Triton's interpreter. Nothing
here imports vLLM or pydantic: only ``vllm_halluguard.kernels`` (torch + Triton) is used, and the
``env`` stage records that neither got imported.

Stages, each independent (a failing stage is recorded and the next one runs):

* ``env``: device, versions, which optional modules are importable;
* ``correctness``: :func:`~vllm_halluguard.kernels.triton_attention.paged_attention_into` against
  the dense torch reference (:func:`~vllm_halluguard.kernels.paged.paged_attention_ref`) on every
  cache layout, including vLLM 0.32's per-layer view ``[NB, Hkv, BS, 2D]`` ("hnd2d") in both its
  contiguous order and vLLM's default physical order (``LBNHC``: token-major inside a page), with
  sinks, a key mask, statistics, forced split-KV and the stats-only pass; outputs poisoned with
  NaN before each call;
* ``bench``: a fixed, small set of shapes on the hnd2d view in vLLM's default order, bf16: the
  kernel plain / with sinks + stats / + a key mask / stats only, SDPA on dense K/V, and vLLM's
  ``unified_attention`` where ``--vllm-path`` holds a folder from scripts/build_vllm_attention.py.
  Every call runs once (compiles) before any timing;
* ``fa3``: FlashAttention 3 on the same shapes and the same hnd2d view (Hopper's native kernel in
  vLLM 0.32), from an importable ``flash_attn_interface`` (the upstream hopper build, e.g. carried as
  a wheel) or a carried ``vllm.vllm_flash_attn`` under ``--vllm-path``; checked against the
  reference before timing; skipped with the reason when neither imports.

Every result is one JSON line appended to ``OUT/gpu_check.jsonl`` the moment it exists (``OUT`` =
``--out``, default ``$OUT``); a human-readable table goes to stdout and ``OUT/gpu_check.md``. The
script enforces ``--budget-s`` itself: each unit of work starts only while time is left (the rest is
recorded as skipped), and a watchdog thread ends the process with a ``timeout`` line if one unit
hangs past the budget plus a grace period. Exit status: 0 when every stage that ran passed, 1
otherwise.

    python scripts/gpu_check.py --out "$OUT" --budget-s 420 [--vllm-path build/vllm-attn]
    TRITON_INTERPRET=1 python scripts/gpu_check.py --smoke --out /tmp/gc   # CPU, seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STAGES = ("env", "correctness", "bench", "fa3")
#: Largest |Δ| to the fp32 reference: output (by dtype) and the fp32 statistics (as tests/test_kernels.py).
TOL_OUT = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
TOL_STAT = 1e-4
#: Cache layouts checked: name -> (layout of kernels.layouts, physical order of hnd2d or None).
LAYOUT_CASES: dict[str, tuple[str, str | None]] = {
    "flash": ("flash", None),
    "triton": ("triton", None),
    "hnd2d": ("hnd2d", "HND"),  # [NB, Hkv, BS, 2D] contiguous (vLLM layout LBHNC)
    "hnd2d-nhd": ("hnd2d", "NHD"),  # the same logical view, token-major pages (vLLM's default LBNHC)
}


class Recorder:
    """Appends one JSON line per result to ``path`` (flushed and fsynced at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.failed = False

    def write(self, stage: str, status: str, **data: Any) -> None:
        line = json.dumps({"stage": stage, "status": status, "t": round(time.time(), 3), **data}, default=str)
        with self.lock, self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if status in ("fail", "error", "timeout"):
            self.failed = True
        print(f"[{stage}] {status} {json.dumps(data, default=str)[:300]}", flush=True)


@dataclass
class Budget:
    start: float
    seconds: float

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


@dataclass
class Ctx:
    args: argparse.Namespace
    rec: Recorder
    budget: Budget
    device: str
    md: list[str]


# ------------------------------------------------------------------------------------ test data


def kv_cache(
    case: str, num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cache, k_cache, v_cache)`` of one layer in ``case`` (see :data:`LAYOUT_CASES`), NaN-filled."""
    from vllm_halluguard.kernels.layouts import allocate_kv_cache, split_kv

    layout, order = LAYOUT_CASES[case]
    if order == "NHD":  # vLLM's create_kv_cache_views with LBNHC: logical [NB, H, BS, 2D], pages [BS, H, 2D]
        cache = torch.full((num_blocks, block_size, hkv, 2 * d), float("nan"), dtype=dtype, device=device)
        cache = cache.permute(0, 2, 1, 3)
    else:
        cache = allocate_kv_cache(layout, num_blocks, block_size, hkv, d, dtype, device, fill=float("nan"))  # type: ignore[arg-type]
    k_cache, v_cache = split_kv(cache, layout)  # type: ignore[arg-type]
    return cache, k_cache, v_cache


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scale: float
    sinks: torch.Tensor
    key_mask: torch.Tensor
    max_seq_len: int
    max_q: int

    def common(self) -> tuple[Any, ...]:
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_table)


def make_batch(
    shapes: list[tuple[int, int]],
    case: str,
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
) -> Batch:
    """``(query_len, seq_len)`` per sequence, a shuffled page table, the unused slots left NaN."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per = [-(-s // block_size) for _, s in shapes]
    width = max(blocks_per)
    num_blocks = sum(blocks_per) + 2
    _, k_cache, v_cache = kv_cache(case, num_blocks, block_size, hkv, d, dtype, device)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(shapes), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per):
        table[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    for b, (_, s) in enumerate(shapes):  # write K/V token by token through the page table
        pos = torch.arange(s)
        blocks, offs = table[b, pos // block_size].long(), pos % block_size
        k = torch.randn(s, hkv, d, generator=g).to(dtype).to(device)
        v = torch.randn(s, hkv, d, generator=g).to(dtype).to(device)
        k_cache[blocks.to(device), offs.to(device)] = k
        v_cache[blocks.to(device), offs.to(device)] = v
    qlens = torch.tensor([ql for ql, _ in shapes])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), qlens.cumsum(0)]).to(torch.int32)
    t = int(qlens.sum())
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    sinks = torch.randn(t, hq, generator=g) * 2
    sinks[torch.rand(t, hq, generator=g) < 0.5] = float("-inf")
    key_mask = torch.rand(len(shapes), width * block_size, generator=g) < 0.75
    key_mask[:, 0] = True
    return Batch(
        q.to(device),
        k_cache,
        v_cache,
        qsl.to(device),
        torch.tensor([s for _, s in shapes], dtype=torch.int32, device=device),
        table.to(device),
        1.0 / d**0.5,
        sinks.to(device),
        key_mask.to(device),
        max(s for _, s in shapes),
        int(qlens.max()),
    )


# ------------------------------------------------------------------------------------------ stages


def stage_env(ctx: Ctx) -> None:
    import triton

    import vllm_halluguard.kernels.paged
    import vllm_halluguard.kernels.triton_attention  # noqa: F401 - what the check imports, imported

    blocked = {m: m in sys.modules for m in ("vllm", "pydantic")}
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "device": ctx.device,
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "imported_vllm_or_pydantic": blocked,
    }
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    for mod in ("flash_attn_interface", "flash_attn", "numpy", "pytest"):
        try:
            importlib.import_module(mod)
            info[f"has_{mod}"] = True
        except Exception as exc:  # any import failure is a finding to record
            info[f"has_{mod}"] = f"no: {type(exc).__name__}: {str(exc)[:120]}"
    status = "fail" if any(blocked.values()) else "ok"
    ctx.rec.write("env", status, **info)


def correctness_cases(smoke: bool) -> Iterator[dict[str, Any]]:
    """Fixed cases. GPU: every layout with MHA 32/32 and GQA 28/4 in bf16, and vLLM's default view
    also in fp16 and fp32 (D 128, block 16). Smoke: every layout once, GQA 6/2, bf16, D 16."""
    if smoke:
        dtypes, d, heads = [torch.bfloat16], 16, [(6, 2)]
        shapes = [(3, 20), (1, 1), (1, 30), (0, 5)]
    else:
        dtypes, d, heads = [torch.bfloat16, torch.float16, torch.float32], 128, [(32, 32), (28, 4)]
        # chunked prefill with context, decode at position 0, decodes, a full prefill, a padded request
        shapes = [(37, 300), (1, 1), (1, 700), (130, 130), (0, 9), (1, 2050)]
    for case in LAYOUT_CASES:
        for dtype in dtypes if case == "hnd2d-nhd" else dtypes[:1]:
            for hq, hkv in heads:
                yield {
                    "layout": case,
                    "dtype": dtype,
                    "hq": hq,
                    "hkv": hkv,
                    "d": d,
                    "block_size": 16,
                    "shapes": shapes,
                }


def check_one(spec: dict[str, Any], device: str, seed: int) -> dict[str, Any]:
    """One batch, four kernel variants, each against the reference; max errors and pass/fail."""
    from vllm_halluguard.kernels.paged import paged_attention_ref
    from vllm_halluguard.kernels.triton_attention import paged_attention_into

    dtype = spec["dtype"]
    x = make_batch(
        spec["shapes"],
        spec["layout"],
        spec["hq"],
        spec["hkv"],
        spec["d"],
        spec["block_size"],
        dtype,
        device,
        seed,
    )
    ref_plain = paged_attention_ref(*x.common(), x.scale, return_stats=True)
    ref_full = paged_attention_ref(
        *x.common(), x.scale, sinks=x.sinks, key_mask=x.key_mask, return_stats=True
    )
    ref_mask_stats = paged_attention_ref(*x.common(), x.scale, key_mask=x.key_mask, return_stats=True)
    t, hq = x.q.shape[:2]
    variants: dict[str, tuple[dict[str, Any], Any, bool]] = {
        "plain": ({}, ref_plain, True),
        "sinks+mask+stats": ({"sinks": x.sinks, "key_mask": x.key_mask}, ref_full, True),
        "split3+sinks+mask": (
            {"sinks": x.sinks, "key_mask": x.key_mask, "num_splits": 3, "tile_n": 16},
            ref_full,
            True,
        ),
        "stats-only+mask": ({"key_mask": x.key_mask}, ref_mask_stats, False),
    }
    result: dict[str, Any] = {}
    ok = True
    for name, (kw, ref, need_out) in variants.items():
        out = torch.full_like(x.q, float("nan")) if need_out else None
        lse = torch.full((t, hq), float("nan"), device=device)
        ent = torch.full_like(lse, float("nan"))
        sinks, key_mask = kw.pop("sinks", None), kw.pop("key_mask", None)
        v = x.v_cache if need_out else None
        paged_attention_into(
            out, lse, ent, x.q, x.k_cache, v, *x.common()[3:], x.scale, sinks, key_mask, **kw
        )
        errs = {}
        if out is not None:
            errs["out"] = _max_err(out, ref[0])
        errs["lse"] = _max_err(lse, ref[1])
        errs["entropy"] = _max_err(ent, ref[2])
        passed = (
            errs.get("out", 0.0) <= TOL_OUT[dtype] and errs["lse"] <= TOL_STAT and errs["entropy"] <= TOL_STAT
        )
        ok &= passed
        result[name] = {"max_err": errs, "pass": passed}
    return {"pass": ok, "variants": result}


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |Δ| where the reference is finite (inf if a value is NaN or an infinite one differs)."""
    got, want = got.float(), want.float()
    inf = ~torch.isfinite(want)
    if bool(inf.any()) and not torch.equal(got[inf], want[inf]):
        return float("inf")
    diff = (got[~inf] - want[~inf]).abs()
    if diff.numel() == 0:
        return 0.0
    worst = float(diff.max())
    return float("inf") if worst != worst else worst


def stage_correctness(ctx: Ctx) -> None:
    for i, spec in enumerate(correctness_cases(ctx.args.smoke)):
        label = {k: str(v).replace("torch.", "") for k, v in spec.items() if k != "shapes"}
        if ctx.budget.left() < ctx.args.reserve_s:
            ctx.rec.write("correctness", "skip", reason="budget", **label)
            continue
        t0 = time.monotonic()
        try:
            res = check_one(spec, ctx.device, seed=100 + i)
        except Exception as exc:  # one case's crash must not hide the others
            ctx.rec.write(
                "correctness", "error", error=repr(exc), trace=traceback.format_exc()[-1500:], **label
            )
            continue
        status = "ok" if res["pass"] else "fail"
        ctx.rec.write("correctness", status, seconds=round(time.monotonic() - t0, 2), **label, **res)


@dataclass(frozen=True)
class Shape:
    phase: str
    batch: int
    q_len: int
    seq_len: int

    def label(self) -> str:
        return f"{self.phase} b{self.batch} q{self.q_len} ctx{self.seq_len}"


def bench_shapes(smoke: bool) -> list[tuple[tuple[int, int], Shape]]:
    """The fixed benchmark set (LLaVA-1.5-7B: 32/32 heads; a GQA 28/4 model like Qwen2-VL-7B)."""
    if smoke:
        return [((4, 4), Shape("decode", 2, 1, 24)), ((6, 2), Shape("prefill", 1, 16, 16))]
    out = []
    for heads in ((32, 32), (28, 4)):
        out += [
            (heads, Shape("decode", 1, 1, 2000)),
            (heads, Shape("decode", 32, 1, 2000)),
            (heads, Shape("prefill", 1, 2000, 2000)),
            (heads, Shape("prefill", 8, 600, 600)),
        ]
    return out


def bench_batch(heads: tuple[int, int], shape: Shape, ctx: Ctx) -> Batch:
    d = 16 if ctx.args.smoke else 128
    return make_batch(
        [(shape.q_len, shape.seq_len)] * shape.batch,
        "hnd2d-nhd",
        heads[0],
        heads[1],
        d,
        16,
        torch.bfloat16,
        ctx.device,
        7,
    )


def timer(ctx: Ctx) -> Callable[[Callable[[], Any]], float]:
    """Median ms of a callable: do_bench on GPU (L2 flushed), one host-timed call in smoke mode."""
    if ctx.args.smoke:

        def host(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        return host
    import triton.testing

    return lambda fn: float(
        triton.testing.do_bench(fn, warmup=ctx.args.warmup_ms, rep=ctx.args.rep_ms, return_mode="median")
    )


def sdpa_dense(x: Batch, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    group = x.q.shape[1] // x.k_cache.shape[2]

    def one(cache: torch.Tensor) -> torch.Tensor:
        dense = cache[x.block_table.long()].flatten(1, 2)[:, : shape.seq_len]
        return dense.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()

    return one(x.k_cache), one(x.v_cache)


def run_timed(
    ctx: Ctx,
    stage: str,
    heads: tuple[int, int],
    shape: Shape,
    calls: dict[str, Callable[[], Any]],
    extra: dict[str, Any],
) -> None:
    """Warm every call once (compiles, outside timing), then time each; one JSON line."""
    sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
    compile_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in list(calls.items()):
        t0 = time.monotonic()
        try:
            fn()
            sync()
        except Exception as exc:  # e.g. another vLLM signature: record, drop the column
            errors[name] = repr(exc)[:300]
            del calls[name]
        compile_s[name] = round(time.monotonic() - t0, 3)
    measure = timer(ctx)
    ms: dict[str, float] = {}
    for name, fn in calls.items():
        if ctx.budget.left() < ctx.args.reserve_s:
            errors[name] = "skipped: budget"
            continue
        try:
            ms[name] = round(measure(fn), 5)
        except Exception as exc:
            errors[name] = repr(exc)[:300]
    status = "ok" if not [e for e in errors.values() if not e.startswith("skipped")] else "error"
    data = {"heads": f"{heads[0]}/{heads[1]}", "shape": shape.label(), "layout": "hnd2d-nhd", "dtype": "bf16"}
    ctx.rec.write(stage, status, ms=ms, warm_s=compile_s, errors=errors, **data, **extra)
    base = ms.get("plain") or ms.get("fa3")
    cells = " | ".join(f"{k} {v:.4f} ms" + (f" ({v / base:.2f}x)" if base else "") for k, v in ms.items())
    ctx.md.append(f"| {stage} | {data['heads']} | {data['shape']} | {cells} |")


def per_shape(ctx: Ctx, stage: str, one: Callable[[tuple[int, int], Shape], None]) -> None:
    """``one(heads, shape)`` for every benchmark shape while the budget lasts; errors recorded."""
    for heads, shape in bench_shapes(ctx.args.smoke):
        label = {"heads": f"{heads[0]}/{heads[1]}", "shape": shape.label()}
        if ctx.budget.left() < ctx.args.reserve_s:
            ctx.rec.write(stage, "skip", reason="budget", **label)
            continue
        try:
            one(heads, shape)
        except Exception as exc:  # one shape's failure must not hide the next
            ctx.rec.write(stage, "error", error=repr(exc), trace=traceback.format_exc()[-1500:], **label)
        finally:
            if ctx.device == "cuda":
                torch.cuda.empty_cache()


def bench_one(ctx: Ctx, heads: tuple[int, int], shape: Shape, vllm_fn: Callable[..., Any] | None) -> None:
    from vllm_halluguard.kernels.paged import paged_attention_ref
    from vllm_halluguard.kernels.triton_attention import paged_attention_into

    x = bench_batch(heads, shape, ctx)
    out = torch.empty_like(x.q)
    lse = torch.empty(x.q.shape[:2], device=ctx.device)
    ent = torch.empty_like(lse)
    common, n = (*x.common(), x.scale), shape.seq_len
    stats_args = (x.q, x.k_cache, None, *common[3:])
    kd, vd = sdpa_dense(x, shape)
    qd = x.q.view(shape.batch, shape.q_len, *x.q.shape[1:]).transpose(1, 2)
    calls: dict[str, Callable[[], Any]] = {
        "plain": lambda: paged_attention_into(out, None, None, *common, max_seq_len=n),
        "sinks+stats": lambda: paged_attention_into(out, lse, ent, *common, x.sinks, max_seq_len=n),
        "+mask": lambda: paged_attention_into(out, lse, ent, *common, x.sinks, x.key_mask, max_seq_len=n),
        "stats only": lambda: paged_attention_into(None, lse, ent, *stats_args, max_seq_len=n),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=shape.q_len > 1, scale=x.scale
        ),
    }
    paged_attention_into(out, None, None, *common, max_seq_len=n)
    ref = paged_attention_ref(*common)[0]
    extra = {"max_err_plain": _max_err(out, ref)}
    if vllm_fn is not None:
        vllm_out, more = vllm_calls(vllm_fn, x, shape)
        calls |= more
        try:
            more["vllm-2d"]()
            extra["max_err_vllm_2d"] = _max_err(vllm_out, ref)
        except Exception as exc:  # run_timed records the call's error again; keep the plain columns
            extra["max_err_vllm_2d"] = repr(exc)[:200]
    run_timed(ctx, "bench", heads, shape, calls, extra)


def stage_bench(ctx: Ctx) -> None:
    vllm_fn = load_vllm_unified(ctx)
    per_shape(ctx, "bench", lambda heads, shape: bench_one(ctx, heads, shape, vllm_fn))


def load_vllm_unified(ctx: Ctx) -> Callable[..., Any] | None:
    if not ctx.args.vllm_path:
        return None
    path = str(Path(ctx.args.vllm_path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as exc:
        ctx.rec.write(
            "bench", "skip", part="vllm unified_attention", reason=f"not importable from {path}: {exc!r}"
        )
        return None
    return unified_attention  # type: ignore[no-any-return]


def vllm_calls(
    fn: Callable[..., Any], x: Batch, shape: Shape
) -> tuple[torch.Tensor, dict[str, Callable[[], Any]]]:
    """vLLM's ``unified_attention`` 2D (and 3D for decode) on the same view, and their output tensor."""
    out = torch.empty_like(x.q)
    kw = dict(
        q=x.q, k=x.k_cache, v=x.v_cache, out=out, cu_seqlens_q=x.query_start_loc,
        max_seqlen_q=shape.q_len, seqused_k=x.seq_lens, max_seqlen_k=shape.seq_len, softmax_scale=x.scale,
        causal=True, window_size=(-1, -1), block_table=x.block_table, softcap=0, q_descale=None,
        k_descale=None, v_descale=None,
    )  # fmt: skip
    calls = {"vllm-2d": lambda: fn(**kw)}
    if shape.phase == "decode":  # the 3D (split-KV) path, scratch as vLLM's builder allocates it
        seg, t, hq, d = 16, *x.q.shape
        pad = 1 << (d - 1).bit_length()
        kw3 = kw | {
            "seq_threshold_3D": shape.batch,
            "num_par_softmax_segments": seg,
            "softmax_segm_output": torch.empty(t, hq, seg, pad, device=x.q.device),
            "softmax_segm_max": torch.empty(t, hq, seg, device=x.q.device),
            "softmax_segm_expsum": torch.empty(t, hq, seg, device=x.q.device),
        }
        calls["vllm-3d"] = lambda: fn(**kw3)
    return out, calls


def find_fa3(ctx: Ctx) -> tuple[str, Callable[[Batch, Shape, torch.Tensor], Any]] | str:
    """``(source, call)`` of an importable FA3, or the reason there is none."""
    reasons = []
    if ctx.device == "cuda" and torch.cuda.get_device_capability(0)[0] != 9:
        return f"FA3 needs a Hopper GPU (sm_90), this is {torch.cuda.get_device_name()}"
    try:
        fai = importlib.import_module("flash_attn_interface")  # upstream hopper/ build (flash_attn_3)

        def upstream(x: Batch, shape: Shape, out: torch.Tensor) -> Any:
            return fai.flash_attn_with_kvcache(
                x.q, x.k_cache, x.v_cache, cache_seqlens=x.seq_lens, page_table=x.block_table,
                cu_seqlens_q=x.query_start_loc, max_seqlen_q=shape.q_len, softmax_scale=x.scale, causal=True,
            )  # fmt: skip

        return "flash_attn_interface", upstream
    except Exception as exc:
        reasons.append(f"flash_attn_interface: {exc!r}"[:200])
    if ctx.args.vllm_path:
        path = str(Path(ctx.args.vllm_path).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        vfa = importlib.import_module("vllm.vllm_flash_attn.flash_attn_interface")
        if not vfa.is_fa_version_supported(3):
            raise RuntimeError(vfa.fa_version_unsupported_reason(3))

        def vendored(x: Batch, shape: Shape, out: torch.Tensor) -> Any:
            return vfa.flash_attn_varlen_func(
                q=x.q, k=x.k_cache, v=x.v_cache, out=out, cu_seqlens_q=x.query_start_loc,
                max_seqlen_q=shape.q_len, seqused_k=x.seq_lens, max_seqlen_k=shape.seq_len,
                softmax_scale=x.scale, causal=True, block_table=x.block_table, fa_version=3,
            )  # fmt: skip

        return "vllm.vllm_flash_attn", vendored
    except Exception as exc:
        reasons.append(f"vllm.vllm_flash_attn: {exc!r}"[:200])
    return "no FA3 importable (" + "; ".join(reasons) + ")"


def fa3_one(
    ctx: Ctx,
    heads: tuple[int, int],
    shape: Shape,
    source: str,
    call: Callable[[Batch, Shape, torch.Tensor], Any],
) -> None:
    from vllm_halluguard.kernels.paged import paged_attention_ref
    from vllm_halluguard.kernels.triton_attention import paged_attention_into

    x = bench_batch(heads, shape, ctx)
    out = torch.full_like(x.q, float("nan"))
    got = call(x, shape, out)
    got = got[0] if isinstance(got, tuple) else got
    err = _max_err(got.reshape(x.q.shape), paged_attention_ref(*x.common(), x.scale)[0])
    mine = torch.empty_like(x.q)
    calls = {
        "fa3": lambda: call(x, shape, out),
        "plain": lambda: paged_attention_into(
            mine, None, None, *x.common(), x.scale, max_seq_len=shape.seq_len
        ),
    }
    extra = {"source": source, "max_err_fa3": err, "fa3_pass": err <= TOL_OUT[torch.bfloat16]}
    run_timed(ctx, "fa3", heads, shape, calls, extra)
    if not extra["fa3_pass"]:
        ctx.rec.write("fa3", "fail", reason=f"FA3 differs from the reference by {err}", **extra)


def stage_fa3(ctx: Ctx) -> None:
    found = find_fa3(ctx)
    if isinstance(found, str):
        ctx.rec.write("fa3", "skip", reason=found)
        return
    source, call = found
    per_shape(ctx, "fa3", lambda heads, shape: fa3_one(ctx, heads, shape, source, call))


STAGE_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "env": stage_env,
    "correctness": stage_correctness,
    "bench": stage_bench,
    "fa3": stage_fa3,
}


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="results folder")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget (seconds)")
    p.add_argument(
        "--grace-s", type=float, default=30.0, help="watchdog: hard stop this long after the budget"
    )
    p.add_argument("--reserve-s", type=float, default=15.0, help="start no new unit with less than this left")
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    p.add_argument("--vllm-path", default=None, help="folder with a `vllm` package (build_vllm_attention.py)")
    p.add_argument("--warmup-ms", type=int, default=10)
    p.add_argument("--rep-ms", type=int, default=40)
    p.add_argument(
        "--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, nothing timed on a GPU"
    )
    p.add_argument(
        "--fail-stage", choices=STAGES, default=None, help="(tests) make this stage raise at its start"
    )
    p.add_argument("--stall-stage", choices=STAGES, default=None, help="(tests) make this stage hang")
    return p.parse_args(argv)


def watchdog(rec: Recorder, seconds: float) -> threading.Timer:
    def fire() -> None:
        rec.write("watchdog", "timeout", reason=f"still running {seconds:.0f} s after the start; hard exit")
        os._exit(3)

    timer_ = threading.Timer(seconds, fire)
    timer_.daemon = True
    timer_.start()
    return timer_


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    elif not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (or --smoke for the CPU interpreter)", file=sys.stderr)
        return 2
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    rec = Recorder(args.out / "gpu_check.jsonl")
    budget = Budget(time.monotonic(), args.budget_s)
    dog = watchdog(rec, args.budget_s + args.grace_s)
    ctx = Ctx(
        args,
        rec,
        budget,
        "cpu" if args.smoke else "cuda",
        ["| stage | heads | shape | times |", "|---|---|---|---|"],
    )
    torch.manual_seed(0)
    for name in args.stages:
        if budget.left() < args.reserve_s:
            rec.write(name, "skip", reason="budget")
            continue
        t0 = time.monotonic()
        try:
            if args.fail_stage == name:
                raise RuntimeError(f"--fail-stage {name}: deliberate failure")
            if args.stall_stage == name:
                threading.Event().wait()  # only the watchdog ends this
            STAGE_FUNCS[name](ctx)
            rec.write(f"{name}:done", "ok", seconds=round(time.monotonic() - t0, 2))
        except Exception as exc:  # a failed stage never hides the next one
            rec.write(name, "error", error=repr(exc), trace=traceback.format_exc()[-2000:])
    dog.cancel()
    table = "\n".join(ctx.md)
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    rec.write("summary", "fail" if rec.failed else "ok", seconds=round(time.monotonic() - budget.start, 1))
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
