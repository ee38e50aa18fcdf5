"""No Triton compile while serving: every specialisation a serving-like run launches was listed (and, on a
GPU, compiled) by the start-up warm-up (:mod:`vllm_halluguard.kernels.warmup`).

On CPU the kernel runs in Triton's interpreter, which compiles nothing, so the launches are compared by
their specialisation keys (:func:`~vllm_halluguard.kernels.triton_attention.launch_key`: Triton's own
argument binder, what ``JITFunction.run`` keys its kernel cache on), recorded without running
(``record_launches("record")``) and with a pretend 132-SM device so that the automatic split count
varies as on an H100. On CUDA the same run launches for real and Triton's kernel caches must not grow
(that branch has not run: no GPU was available when it was written).
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_halluguard.kernels import triton_attention as TA
from vllm_halluguard.kernels import warmup as W
from vllm_halluguard.kernels.layouts import allocate_kv_cache, split_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODE = "launch" if DEVICE == "cuda" else "record"
SMS = 132  # an H100's multiprocessors (pretended on CPU)
# LLaVA-like GQA geometry, small: Hq 8, Hkv 2, D 64, 16-token pages, bf16 (the GPU dtype).
HQ, HKV, D, BS, DTYPE = 8, 2, 64, 16, torch.bfloat16
MAX_BLOCKS, MAX_REQS = 96, 24  # 96 pages of 16 hold the longest sequence of the run (1024 + 500 keys)


@pytest.fixture(scope="module")
def served():
    """The warm-up's keys, then one serving-like run's keys and automatic split counts, on a 132-SM GPU
    (CPU: pretended; the launches are only recorded), and Triton's kernel caches around the run."""
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setattr(TA, "num_sms", lambda device: SMS)
        chosen: list[int] = []
        real = TA.auto_num_splits

        def auto(*args, **kwargs):
            chosen.append(real(*args, **kwargs))
            return chosen[-1]

        mp.setattr(TA, "auto_num_splits", auto)
        k, v = caches()
        warmed = warm_keys(k, v)
        before = _kernel_cache_sizes()
        launched = serving_run(k, v)
        return {
            "warmed": warmed,
            "launched": launched,
            "splits": set(chosen),
            "caches": (before, _kernel_cache_sizes()),
        }


def caches(dtype=DTYPE):
    cache = allocate_kv_cache("hnd2d", MAX_REQS * MAX_BLOCKS, BS, HKV, D, dtype, device=DEVICE)
    return split_kv(cache, "hnd2d")


def warm_keys(k, v, drop=None) -> set:
    """The warm-up's keys for this geometry (``drop``: leave out variants, to check the check)."""
    with TA.record_launches("compile" if DEVICE == "cuda" else "record") as keys:
        for q_layout in W.Q_LAYOUTS:
            for variant in W.variants(split_kv=True):
                if drop is None or not drop(variant):
                    W.launch_variant(variant, q_layout, HQ, k, v)
    return keys


def serving_run(k, v, seed: int = 0) -> set:
    """Launches as ``engine/execute.py`` makes them: 1..16 reworked rows of decodes and prefill chunks,
    with and without sinks and key masks, the query as a row slice of vLLM's fused QKV or an index copy,
    rows of a persistent block table."""
    rng = random.Random(seed)
    table = torch.arange(MAX_REQS * MAX_BLOCKS, dtype=torch.int32, device=DEVICE).view(MAX_REQS, MAX_BLOCKS)
    with TA.record_launches(MODE) as keys:
        for rows in range(1, 17):
            for mix in ("decode", "prefill", "mixed"):
                longest = 1024 if mix == "prefill" else 40  # long chunks: enough programs for no split
                qlens = [
                    1 if mix == "decode" or (mix == "mixed" and r % 2) else rng.randint(2, longest)
                    for r in range(rows)
                ]
                seq_lens = [q + rng.randint(0, 500) for q in qlens]
                assert max(seq_lens) <= MAX_BLOCKS * BS  # real launches (CUDA) read only their pages
                t = sum(qlens)
                qkv = torch.randn(t + 3, HQ + 2 * HKV, D, device=DEVICE).to(DTYPE)
                picked = torch.tensor(sorted(rng.sample(range(MAX_REQS), rows)), device=DEVICE)
                qsl = torch.tensor(
                    [0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
                )
                lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
                for features in ("plain", "sinks", "mask", "sinks+mask"):
                    for q in (qkv[1 : t + 1, :HQ], qkv[torch.arange(t, device=DEVICE) + 2, :HQ]):
                        sinks = torch.randn(t, HQ, device=DEVICE) if "sinks" in features else None
                        mask = None
                        if "mask" in features:
                            mask = torch.rand(rows, max(seq_lens), device=DEVICE) < 0.7
                        out = torch.empty_like(q)
                        lse = torch.empty(t, HQ, device=DEVICE)
                        TA.paged_attention_into(
                            out,
                            lse,
                            torch.empty_like(lse),
                            q,
                            k,
                            v,
                            qsl,
                            lens,
                            table[picked],
                            0.125,
                            sinks,
                            mask,
                        )
    return keys


def test_serving_launches_no_specialisation_the_warmup_missed(served):
    warmed, launched, counts = served["warmed"], served["launched"], served["splits"]
    assert launched, "the run must launch the kernel"
    assert 1 in counts and len(counts) >= 8, f"the run must see many split counts, saw {sorted(counts)}"
    new = launched - warmed
    assert not new, f"{len(new)} specialisations first launched while serving, e.g. {min(new)!r:.400}"
    before, after = served["caches"]
    assert after == before  # CUDA: nothing compiled during the run (CPU: both empty)


def test_variant_count():
    """bf16: 2 tile configurations x sinks x mask x split = 16 main kernels (both query layouts have the
    same stride classes here) and 2 merge kernels (sinks or not); fp32 has one tile configuration."""
    k, v = caches()
    names = [key[0] for key in warm_keys(k, v)]
    assert (names.count("_paged_attention_kernel"), names.count("_merge_splits_kernel")) == (16, 2)
    k32, v32 = caches(torch.float32)
    with TA.record_launches("record") as keys:
        W.launch_variants(HQ, k32, v32, split_kv=True)
    assert len(keys) == 8 + 2
    with TA.record_launches("record") as cpu_keys:
        W.launch_variants(HQ, k32, v32, split_kv=False)  # no SMs: never split, no merge
    assert len(cpu_keys) == 4


def test_a_warmup_missing_variants_is_caught(served):
    """The comparison can fail: a warm-up without the masked variants misses what the run launches."""
    k, v = caches()
    partial = warm_keys(k, v, drop=lambda variant: variant.mask)
    assert served["launched"] - partial


def test_split_count_is_a_runtime_value():
    """Split counts 2..16 share one specialisation (the old kernel had one per count)."""
    k, v = caches()
    keys = []
    for splits in (2, 3, 5, 16):
        with TA.record_launches("record") as got:
            q = torch.zeros(3, HQ, D, dtype=DTYPE, device=DEVICE)
            ints = {"dtype": torch.int32, "device": DEVICE}
            lse, entropy = torch.empty(3, HQ, device=DEVICE), torch.empty(3, HQ, device=DEVICE)
            TA.paged_attention_into(
                torch.empty_like(q), lse, entropy, q, k, v, torch.tensor([0, 1, 2, 3], **ints),
                torch.tensor([1, 40, 17], **ints), torch.zeros(3, 2, **ints), 1.0,
                torch.zeros(3, HQ, device=DEVICE), torch.ones(3, 40, dtype=torch.bool, device=DEVICE),
                num_splits=splits,
            )  # fmt: skip
        keys.append(got)
    assert all(got == keys[0] for got in keys) and len(keys[0]) == 2


def _kernel_cache_sizes() -> list[int]:
    """Compiled binaries in Triton's in-process caches of both kernels (empty in the interpreter)."""
    sizes = []
    for kernel in (TA._paged_attention_kernel, TA._merge_splits_kernel):
        for caches_ in getattr(kernel, "device_caches", {}).values():
            sizes.append(len(caches_[0]))
    return sizes


def test_worker_compiles_before_vllms_warm_up(monkeypatch):
    """The hook runs the warm-up at the start of the worker's ``compile_or_warm_up_model`` (vLLM's GPU
    worker warms V1 and V2 runners there; ``install`` applies it to that class), then vLLM's own."""
    from vllm_halluguard.engine import warmup

    order = []

    class Worker:
        model_runner = "runner"

        def compile_or_warm_up_model(self):
            order.append("vllm")
            return "times"

    warmup.warm_up_first(Worker)
    monkeypatch.setattr(warmup, "warm_up", lambda runner, mode="compile": order.append(runner))
    assert Worker().compile_or_warm_up_model() == "times"
    assert order == ["runner", "vllm"]


def test_warm_up_is_off_without_the_kernel_path(monkeypatch):
    """Native CPU serving (the torch path) and ``HALLUGUARD_KERNEL_WARMUP=0`` list and compile nothing."""
    from vllm_halluguard.engine import plan, warmup

    monkeypatch.setattr(warmup, "kernel_layers", lambda runner: pytest.fail("must not look at layers"))
    monkeypatch.setattr(plan, "rework_engine", lambda: "torch")
    assert warmup.warm_up(object(), mode="record") == set()
    monkeypatch.setattr(plan, "rework_engine", lambda: "kernel")
    monkeypatch.setenv(warmup.WARMUP_ENV, "0")
    assert warmup.warm_up(object(), mode="record") == set()
    monkeypatch.setenv(warmup.WARMUP_ENV, "1")  # the check can fail: now the layers are looked at
    with pytest.raises(pytest.fail.Exception, match="must not look"):
        warmup.warm_up(object(), mode="record")


def kvsmooth_serving_keys(k, v, z_given: bool, seed: int = 0) -> set:
    """KVSmooth update launches as the engine makes them (engine/kvsmooth.py): 1..16 rows of the step's
    tables (long index tensors, uint8 first-token flags or the tokens as a dummy), windows 1..64, every
    flag, layers 0..31, the entropies of a batch of rows (``[T, Hq]`` fp32) or, under tensor
    parallelism, their all-reduced means ``[B]``."""
    from vllm_halluguard.kernels import kvsmooth_update as KU

    rng = random.Random(seed)
    queue = torch.zeros(MAX_REQS, 32, 64, device=DEVICE)
    count = torch.zeros(MAX_REQS, 32, dtype=torch.long, device=DEVICE)
    table = torch.arange(MAX_REQS * MAX_BLOCKS, device=DEVICE).view(MAX_REQS, MAX_BLOCKS)
    with TA.record_launches(MODE) as keys:
        for rows in range(1, 17):
            t = rows + rng.randint(0, 5)
            picked = torch.tensor(sorted(rng.sample(range(MAX_REQS), rows)), device=DEVICE)
            token = torch.tensor(sorted(rng.sample(range(t), rows)), device=DEVICE)
            pos = torch.tensor([rng.randint(1, 500) for _ in range(rows)], device=DEVICE)
            rows_table = table[picked]
            cur = rows_table.gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS
            entropy = torch.rand(t, HQ, device=DEVICE)
            z = entropy[token].mean(-1) if z_given else entropy
            first = pos == 1
            has_first = rng.random() < 0.5
            flags = (first if has_first else token).view(torch.uint8)
            KU.smooth_rows(
                queue, count, rng.randint(0, 31), z, token, picked, flags, cur,
                torch.stack([pos - 1, pos], 1), rows_table, k, v, window=rng.randint(1, 64),
                lo=rng.random() * 0.5, hi=0.5 + rng.random() * 0.5, has_first=has_first,
                inclusive=rng.random() < 0.5, by_window=rng.random() < 0.5, z_given=z_given,
            )  # fmt: skip
    return keys


@pytest.mark.parametrize("z_given", [False, True], ids=["one-rank", "tensor-parallel"])
def test_kvsmooth_update_launches_only_its_warmed_specialisation(z_given):
    """KVSmooth's update has one specialisation per layer geometry, the one the warm-up launches; the
    check fails without that launch."""
    from vllm_halluguard.kernels import kvsmooth_update as KU

    k, v = caches()
    launched = kvsmooth_serving_keys(k, v, z_given)
    with TA.record_launches("record") as warmed:
        KU.launch_variant(HQ, k, v, z_given=z_given)
    assert len(launched) == len(warmed) == 1 and launched == warmed
    assert launched - warm_keys(k, v)  # the attention kernel's warm-up alone misses it
