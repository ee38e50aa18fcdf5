"""FarSight mode B on FlashAttention 3: bf16 sinks in FA3's sink lane vs the project's kernel (fp32 sinks).

Runs vLLM's FLASH_ATTN backend in the CPU engine over the FA3 contract stand-ins
(``tests/helpers/gpu_backends.py``), once with mode-B rows as FA3's native sink lane (the engine's
choice: ``s_aux`` in bf16) and once (``--route kernel``) with them left out of FA3 and computed by the
project's Triton kernel (interpreted). Each request is teacher-forced through the dense reference on
the engine's tokens (max |Δ log-prob|) and run greedily there (token agreement). CPU-engine numbers;
untested on a GPU. Usage (one route per process: the mode is set before vLLM is imported)::

    PYTHONPATH=tests python benchmarks/farsight_fa3_sinks.py --route native
    PYTHONPATH=tests python benchmarks/farsight_fa3_sinks.py --route kernel
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=["native", "kernel"], default="native")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["HALLUGUARD_ATTENTION"] = "triton"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from helpers import gpu_backends

    gpu_backends.apply()
    gpu_backends.select("FLASH_ATTN", 3)
    from helpers.parity import Case, compare, hf_generate, make_llm, run_vllm
    from vllm_halluguard import reference
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY
    from vllm_halluguard.tiny_models import load_hf

    if args.route == "kernel":  # as if FA3 took no sinks: mode B's rows are reworked
        from vllm_halluguard.engine.backends import wrapped

        wrapped("FLASH_ATTN").get_builder_cls()._hg_native_sinks = False
    llm = make_llm("llava", block_size=16)
    specs = [{"method": "farsight", "mode": "B"}, {"method": "farsight", "mode": "B", "sigma": 0.5}]
    cases = [
        Case("llava", 90 + i, max_tokens=args.tokens, extra_args={EXTRA_ARGS_KEY: specs[i % 2]})
        for i in range(args.images)
    ]
    gens = run_vllm(llm, cases)
    model, processor = load_hf("llava")
    worst, agree, total = 0.0, 0, 0
    for case, gen in zip(cases, gens, strict=True):
        spec = (case.extra_args or {})[EXTRA_ARGS_KEY]

        def ctx(spec=spec):
            return reference.apply(model, spec)

        report = compare(gen, hf_generate(model, processor, case, force=gen.token_ids, context=ctx))
        worst = max(worst, report.max_abs_logprob_diff)
        free = hf_generate(model, processor, case, context=ctx)
        agree += sum(a == b for a, b in zip(free.token_ids, gen.token_ids, strict=True))
        total += len(gen.token_ids)
    print(f"route={args.route} max|dlogp|={worst:.2e} same tokens={agree}/{total}")


if __name__ == "__main__":
    main()
