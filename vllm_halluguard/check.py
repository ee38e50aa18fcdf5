"""``halluguard-check``: an operator's first contact with a node, in one command.

On a model (a GPU node with real weights, or ``--fixture NAME`` on CPU) it checks, in order:

1. **plain = no plugin**: plain requests through a vLLM engine started in a separate process with
   no plugin loaded (``VLLM_PLUGINS`` set there before vLLM loads plugins) against the same requests
   through the engine with the plugin: same tokens and log-probs (``--plain-tol``, default 0:
   bit-identical; on a GPU the check sets ``VLLM_BATCH_INVARIANT=1`` in both processes, since vLLM's
   kernels are not batch-invariant otherwise);
2. **each method and one composition = the dense HF reference** (:mod:`vllm_halluguard.reference`)
   on a few images: the reference re-runs the engine's tokens teacher-forced with the config the
   engine resolved; per request the token agreement (steps where the reference's own greedy choice
   is the engine's token, or within ``--logprob-tol`` of it: a near tie) and the largest
   |Δ log-prob| over the engine's top-5 (:func:`vllm_halluguard.parity.compare`);
3. **latency**: each method's batch of all images timed through ``LLM.generate`` after a warm-up,
   as a ratio to the plain batch.

Prints one table and writes the same as JSON (``--json``). Exit status 0 when every check passed.
The engine with the plugin runs first and is shut down before the HF model loads (one GPU holds
one of them at a time); the no-plugin process runs before both.

    halluguard-check --fixture llava --json check.json            # CPU, tiny fixture (the tests)
    halluguard-check --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --json check.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Requests checked against the reference: every method at the served model's presets, and one composition.
SPECS: dict[str, Any] = {
    "kvsmooth": "kvsmooth",
    "prunehal": "prunehal",
    "farsight": "farsight",
    "scr": "scr",
    "kvsmooth+farsight": ["kvsmooth", "farsight"],
}
#: Default |Δ log-prob| tolerance by dtype: fp32 is the project's parity bound; bf16 is a first guess,
#: unmeasured on a GPU (bf16 logits carry ~3 significant digits).
LOGPROB_TOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="halluguard-check", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--fixture", help="a tiny fixture (vllm_halluguard.tiny_models), CPU settings")
    src.add_argument("--model", help="a model path or HF id (GPU node with real weights)")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 fixture, bfloat16 model)")
    p.add_argument("--images", type=int, default=3, help="images (synthetic, seeded) per method")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--methods", nargs="*", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--logprob-tol", type=float, default=None, help="max |Δ log-prob| vs the reference")
    p.add_argument("--plain-tol", type=float, default=0.0, help="max |Δ log-prob| plain vs no plugin")
    p.add_argument("--max-model-len", type=int, default=4096, help="(--model) engine context length")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-plugin-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.fixture else "bfloat16"
    if args.logprob_tol is None:
        args.logprob_tol = LOGPROB_TOL.get(args.dtype, 0.25)
    return args


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM ``LLM`` arguments: the tests' small CPU settings for a fixture, GPU defaults for a model.

    ``enforce_eager`` in both: SCR needs it (docs/deployment.md)."""
    from vllm_halluguard.parity import ENGINE_DEFAULTS

    if args.fixture:
        return {**ENGINE_DEFAULTS, "dtype": args.dtype, "block_size": 32}
    return {
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "max_num_seqs": 16,
        "seed": 0,
        "limit_mm_per_prompt": {"image": 1},
    }


def model_ref(args: argparse.Namespace) -> Any:
    """What :class:`~vllm_halluguard.parity.Case` and ``make_llm`` take: a fixture name or a path."""
    return args.fixture if args.fixture else args.model


def cases(args: argparse.Namespace, spec: Any) -> list[Any]:
    from vllm_halluguard.parity import method_case

    return [method_case(model_ref(args), seed, spec) for seed in range(args.images)]


def with_tokens(args: argparse.Namespace, cs: list[Any]) -> list[Any]:
    from dataclasses import replace

    return [replace(c, max_tokens=args.max_tokens) for c in cs]


def processor_of(args: argparse.Namespace) -> Any:
    from transformers import AutoProcessor

    from vllm_halluguard.tiny_models import ensure_fixture

    return AutoProcessor.from_pretrained(ensure_fixture(args.fixture) if args.fixture else args.model)


def make_engine(args: argparse.Namespace) -> Any:
    from vllm import LLM

    from vllm_halluguard.tiny_models import ensure_fixture

    model = str(ensure_fixture(args.fixture)) if args.fixture else args.model
    return LLM(model=model, **engine_kwargs(args))


def gen_json(gens: list[Any]) -> list[dict[str, Any]]:
    return [
        {"ids": g.token_ids, "logprobs": [{str(k): v for k, v in s.items()} for s in g.logprobs]}
        for g in gens
    ]


# ------------------------------------------------------------------------------- no-plugin process


def no_plugin_worker(args: argparse.Namespace) -> int:
    """(In the child process) plain generations of the check's images, written as JSON."""
    from vllm_halluguard import plugin
    from vllm_halluguard.parity import run_vllm, shutdown_llm

    llm = make_engine(args)
    gens = run_vllm(llm, with_tokens(args, cases(args, None)), processor_of(args))
    shutdown_llm(llm)
    assert args.no_plugin_worker is not None
    args.no_plugin_worker.write_text(
        json.dumps({"registered": plugin.is_registered(), "gens": gen_json(gens)})
    )
    return 0


def run_no_plugin(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The plain generations from a process where vLLM loads no plugin at all."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plain.json"
        env = {**os.environ, "VLLM_PLUGINS": "none-at-all"}
        cmd = [sys.executable, "-m", "vllm_halluguard.check", *argv, "--no-plugin-worker", str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"the no-plugin engine failed:\n{res.stderr[-3000:]}")
        return dict(json.loads(out.read_text()))


# ------------------------------------------------------------------------------------------- check


def agreement(engine_gen: Any, ref_gen: Any, tol: float) -> float:
    """Share of steps where the reference's greedy choice is the engine's token, or a near tie
    (the engine's token within ``tol`` of the reference's best log-prob)."""
    if not engine_gen.token_ids:
        return 1.0
    agree = 0
    for tok, step in zip(engine_gen.token_ids, ref_gen.logprobs, strict=False):
        best = max(step.values())
        agree += step.get(tok, float("-inf")) >= best - tol
    return agree / len(engine_gen.token_ids)


def plain_report(mine: list[Any], no_plugin: dict[str, Any], tol: float) -> dict[str, Any]:
    """Plain generations with the plugin against the no-plugin process's (``gen_json`` form): same
    tokens, every shared top-k log-prob within ``tol``, and the plugin really absent there."""
    ok = no_plugin["registered"] is False and len(mine) == len(no_plugin["gens"])
    diff = 0.0
    for gen, theirs in zip(mine, no_plugin["gens"], strict=False):
        ok &= gen.token_ids == theirs["ids"] and len(gen.logprobs) == len(theirs["logprobs"])
        for a, b in zip(gen.logprobs, theirs["logprobs"], strict=False):
            ok &= {str(k) for k in a} == set(b)
            diff = max([diff, *(abs(v - b[str(k)]) for k, v in a.items() if str(k) in b)])
    return {"pass": bool(ok and diff <= tol), "max_abs_logprob_diff": diff}


def check(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the three checks; returns the result document (see the module docstring)."""
    import torch

    from vllm_halluguard.parity import compare, hf_generate, run_vllm, shutdown_llm

    result: dict[str, Any] = {"model": model_ref(args), "dtype": args.dtype, "images": args.images}
    result |= {"max_tokens": args.max_tokens, "logprob_tol": args.logprob_tol, "plain_tol": args.plain_tol}
    result["batch_invariant"] = os.environ.get("VLLM_BATCH_INVARIANT") == "1"
    t0 = time.monotonic()
    no_plugin = run_no_plugin(args, argv)
    result["no_plugin_seconds"] = round(time.monotonic() - t0, 1)

    processor = processor_of(args)
    llm = make_engine(args)
    try:
        groups = {"plain": None, **{m: SPECS[m] for m in args.methods}}
        gens: dict[str, list[Any]] = {}
        seconds: dict[str, float] = {}
        # warm-up: one request of every group in one batch (first-use costs stay out of the timings)
        run_vllm(llm, [with_tokens(args, cases(args, spec))[0] for spec in groups.values()], processor)
        for name, spec in groups.items():
            cs = with_tokens(args, cases(args, spec))
            t = time.perf_counter()
            gens[name] = run_vllm(llm, cs, processor)
            seconds[name] = time.perf_counter() - t
    finally:
        shutdown_llm(llm)

    result["plain_vs_no_plugin"] = plain_report(gens["plain"], no_plugin, args.plain_tol)
    plain_ok = result["plain_vs_no_plugin"]["pass"]

    model = load_reference_model(args)
    rows: list[dict[str, Any]] = []
    for name, spec in groups.items():
        resolved = resolved_spec(spec, model.config)
        worst, agree = 0.0, 1.0
        for case, gen in zip(with_tokens(args, cases(args, spec)), gens[name], strict=True):
            ref = hf_generate(
                model, processor, case, force=gen.token_ids, context=reference_context(model, resolved)
            )
            worst = max(worst, compare(gen, ref).max_abs_logprob_diff)
            agree = min(agree, agreement(gen, ref, args.logprob_tol))
        row = {"method": name, "max_abs_logprob_diff": worst, "token_agreement": agree}
        row["pass"] = agree == 1.0 and worst <= args.logprob_tol
        row["seconds"] = round(seconds[name], 4)
        row["overhead"] = round(seconds[name] / seconds["plain"], 3)
        rows.append(row)
    result["methods"] = rows
    result["pass"] = bool(plain_ok and all(r["pass"] for r in rows))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def resolved_spec(spec: Any, hf_config: Any) -> Any:
    """The config the engine serves for ``spec`` on this model, as the reference takes it (None = plain)."""
    from vllm_halluguard.methods.resolve import resolve

    cfg = resolve(spec, hf_config)
    return None if cfg is None else json.loads(cfg.canonical())


def reference_context(model: Any, resolved: Any) -> Callable[[], AbstractContextManager[Any]]:
    """A ``context`` for :func:`~vllm_halluguard.parity.hf_generate`: the dense reference of ``resolved``."""
    from vllm_halluguard.reference import apply

    return lambda: apply(model, resolved)


def load_reference_model(args: argparse.Namespace) -> Any:
    """The HF model the reference runs in: the fixture on CPU (fp32), or ``--model`` on the GPU."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vllm_halluguard.tiny_models import load_hf

    if args.fixture:
        return load_hf(args.fixture)[0]
    dtype = getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation="eager")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def table(result: dict[str, Any]) -> str:
    pv = result["plain_vs_no_plugin"]
    lines = [
        f"halluguard-check {result['model']} ({result['dtype']}, {result['images']} images, "
        f"{result['max_tokens']} tokens, batch-invariant={result['batch_invariant']})",
        f"plain = no-plugin engine: {'PASS' if pv['pass'] else 'FAIL'} "
        f"(max |Δ log-prob| {pv['max_abs_logprob_diff']:.2e}, tolerance {result['plain_tol']:g})",
        "",
        f"| method | = reference | token agreement | max abs Δ log-prob (tol {result['logprob_tol']:g}) "
        "| batch s | vs plain |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["methods"]:
        lines.append(
            f"| {r['method']} | {'PASS' if r['pass'] else 'FAIL'} | {r['token_agreement']:.2f} | "
            f"{r['max_abs_logprob_diff']:.2e} | {r['seconds']:.3f} | {r['overhead']:.2f}x |"
        )
    lines.append(f"\n{'PASS' if result['pass'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.no_plugin_worker is not None:
        return no_plugin_worker(args)
    if args.model and _cuda():
        os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")  # before vLLM is imported, here and in the child
    result = check(args, argv)
    text = table(result)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main())
