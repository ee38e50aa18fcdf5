"""vLLM's GPU attention backends inside the CPU engine (test-only; nothing here ships).

:func:`apply` (before vLLM is imported) makes the CPU engine serve through the plugin's wrapped
``TRITON_ATTN`` or ``FLASH_ATTN``, chosen per engine with :func:`select`:

* **Backend choice as on CUDA.** ``CpuPlatform.get_attn_backend_cls`` returns what
  ``vllm/platforms/cuda.py`` returns, ``cls.__module__ + "." + cls.__qualname__`` of the selected
  class (``_backend_cls_path``; here the registry's override, i.e. the wrapped class), which
  ``vllm/v1/attention/selector.py`` resolves with ``resolve_obj_by_qualname``.
* **TRITON_ATTN**: vLLM's own Python and Triton kernels (``unified_attention``, the cache-write
  kernel), unchanged, in Triton's interpreter (the stand-in ``cpu`` Triton backend of
  :mod:`helpers.engine_modes`); ``torch.cuda.get_device_capability`` answers ``(9, 0)`` (SM90).
* **FLASH_ATTN**: vLLM's builder, impl and FlashAttention Python interface
  (``vllm/vllm_flash_attn/flash_attn_interface.py``: ``flash_attn_varlen_func``,
  ``get_scheduler_metadata``) and ``vllm._custom_ops.reshape_and_cache_flash``, unchanged; only the
  compiled ops under them are torch stand-ins (:mod:`helpers.fa_ops`) that compute the result and
  enforce the real ops' argument contracts. ``fa_utils``' version probe answers the selected FA
  version (3 on SM90, as vLLM picks there; or 2).

The CPU test engine runs fp32 (its parity with the fp32 dense reference is the point); the real
FlashAttention ops take only fp16/bf16 (fp8) tensors, so that one check is relaxed for q/k/v/out
(:data:`helpers.fa_ops.RELAX_FP32`). Every other contract, FA3's bf16 ``s_aux`` included, is
enforced. Untested on a GPU.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from helpers.triton_mode import mixed_cases

#: The backend the next engine gets (``None``: the CPU platform's own choice, ``CPU_ATTN``).
_SELECTED: dict[str, Any] = {"backend": None, "fa_version": 3}
BACKENDS = ("TRITON_ATTN", "FLASH_ATTN")


def select(backend: str | None, fa_version: int = 3) -> None:
    """The backend (and FlashAttention version) of engines started from now on."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(backend)
    _SELECTED.update(backend=backend, fa_version=fa_version)
    if "vllm.v1.attention.selector" in sys.modules:  # vLLM caches its choice per process
        sys.modules["vllm.v1.attention.selector"]._cached_get_attn_backend.cache_clear()


def apply() -> None:
    """Set the stand-ins up; call before anything imports vLLM."""
    if "vllm.triton_utils" in sys.modules:
        raise RuntimeError("the GPU-backend test mode must be applied before vLLM is imported")
    from helpers import engine_modes

    engine_modes._interpreted_triton_for_vllm()
    import torch

    # vLLM's Triton cache write picks its tile sizes by the device's major version
    # (``triton_reshape_and_cache_flash``); FA3's ``mha_fwd`` stand-in reads the arch from here too.
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # type: ignore[assignment]
    _select_backend_as_cuda_does()
    _flash_attn_stand_ins()


def _select_backend_as_cuda_does() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    original = CpuPlatform.get_attn_backend_cls.__func__  # type: ignore[attr-defined]

    def get_attn_backend_cls(
        cls: Any, selected_backend: Any, attn_selector_config: Any, num_heads: Any = None
    ) -> str:
        name = _SELECTED["backend"]
        if name is None or attn_selector_config.use_mla:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        backend_cls = resolve_obj_by_qualname(AttentionBackendEnum[name].get_path())
        module, qualname = backend_cls.full_cls_name()  # vllm/platforms/cuda.py: _backend_cls_path
        return f"{module}.{qualname}"

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[assignment]


def _flash_attn_stand_ins() -> None:
    """Bind what ``flash_attn.py`` binds on CUDA (``if is_flash_attn_varlen_func_available()``)."""
    from vllm import _custom_ops
    from vllm.v1.attention.backends import fa_utils, flash_attn

    from helpers import fa_ops

    flash_attn_interface = _flash_attn_interface()

    fa_ops.install(arch=lambda: 90)

    def version(*args: Any, **kwargs: Any) -> int:
        return int(_SELECTED["fa_version"])

    def supported(v: int) -> bool:
        return v == _SELECTED["fa_version"]

    def supports_sinks() -> bool:  # fa_utils.flash_attn_supports_sinks: FA3 and FA4
        return version() in (3, 4)

    for module in (fa_utils, flash_attn):
        module.get_flash_attn_version = version  # type: ignore[attr-defined]
        module.is_fa_version_supported = supported  # type: ignore[attr-defined]
        module.flash_attn_supports_sinks = supports_sinks  # type: ignore[attr-defined]
        module.flash_attn_varlen_func = flash_attn_interface.flash_attn_varlen_func  # type: ignore[attr-defined]
        module.get_scheduler_metadata = flash_attn_interface.get_scheduler_metadata  # type: ignore[attr-defined]
        module.reshape_and_cache_flash = _custom_ops.reshape_and_cache_flash  # type: ignore[attr-defined]
        module.compile_flash_attn_varlen_func_from_specs = None  # type: ignore[attr-defined]
    flash_attn.is_flash_attn_varlen_func_available = lambda: True  # type: ignore[attr-defined]


def _flash_attn_interface() -> Any:
    """vLLM's ``vllm/vllm_flash_attn/flash_attn_interface.py``, unchanged. Its package refuses to import
    without the CUDA extensions, so the package is entered as a bare namespace first."""
    import importlib
    import types
    from pathlib import Path

    import vllm

    name = "vllm.vllm_flash_attn"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(vllm.__file__).parent / "vllm_flash_attn")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.flash_attn_interface")


def backend_names(worker: Any) -> list[str]:
    """``collective_rpc`` helper: the attention backend classes of a worker's layers."""
    groups = worker.model_runner.attn_groups
    return sorted({g.backend.__module__ + "." + g.backend.__qualname__ for gs in groups for g in gs})


def impl_versions(worker: Any) -> list[int | None]:
    """``collective_rpc`` helper: the FlashAttention version of every attention impl of a worker."""
    from vllm.model_executor.layers.attention import Attention

    model = worker.model_runner.get_model()
    return sorted(
        {
            getattr(m.impl, "vllm_flash_attn_version", None)
            for m in model.modules()
            if isinstance(m, Attention)
        },
        key=str,
    )


os.environ.setdefault("TRITON_INTERPRET", "1")


#: One mixed batch on each backend (the engines' block size, 16): every method, FarSight's two modes, the
#: reclaiming PruneHal and two compositions, plus plain rows.
CASES = mixed_cases(16)
RECLAIM = dict(CASES)[86]  # the reclaiming PruneHal row
#: TRITON_ATTN's kernels run in Triton's interpreter (minutes per batch): plain, FarSight B (the
#: kernel's sink lane), SCR, the reclaim and the composition (KVSmooth, PruneHal, FarSight B).
TRITON_CASES = tuple(c for c in CASES if c[0] in (80, 82, 85, 86, 87))
#: Added to the V1 TRITON_ATTN batch so that it holds every method and both compositions: KVSmooth
#: alone, FarSight C and the SCR composition (PruneHal runs in the reclaim and the composition).
TRITON_MORE = tuple(c for c in CASES if c[0] in (81, 83, 88))
#: TRITON_ATTN on the V2 runner, each property once: a plain row and the two compositions (every
#: method: FarSight B + KVSmooth + PruneHal, SCR + FarSight C); the reclaim is refused there.
TRITON_V2_CASES = tuple(c for c in CASES if c[0] in (80, 87, 88))
MAX_TOKENS = 4
#: (key, backend, FlashAttention version, V2 runner with async scheduling) of each run: FLASH_ATTN as
#: on SM90 (FA3) and TRITON_ATTN on the V1 runner, then both on vLLM 0.32's Hopper defaults (V2 runner,
#: async scheduling). The V2 runs come last: the runner is chosen by an environment variable.
RUNS = (
    ("FLASH_ATTN3", "FLASH_ATTN", 3, False),
    ("TRITON_ATTN", "TRITON_ATTN", None, False),
    ("FLASH_ATTN3_V2", "FLASH_ATTN", 3, True),
    ("TRITON_ATTN_V2", "TRITON_ATTN", None, True),
)
#: The runs whose plain rows are compared with the same plain requests on an engine without the
#: plugin (same backend, stand-ins, runner and scheduling), started first, before vLLM loads plugins.
NO_PLUGIN = ("FLASH_ATTN3", "TRITON_ATTN", "FLASH_ATTN3_V2", "TRITON_ATTN_V2")
#: Under recompute preemption: plain rows, KVSmooth, PruneHal, FarSight B and a composition, compared
#: with the same batch without preemption.
PRUNE = {"method": "prunehal", "r": 0.5}
PREEMPTED = (
    None,
    "kvsmooth",
    None,
    PRUNE,
    None,
    {"method": "farsight", "mode": "B"},
    None,
    ["kvsmooth", PRUNE],
)
#: TRITON_ATTN on V2 (interpreted, slow): a plain row, FarSight B and a composition under preemption.
TRITON_PREEMPTED = (None, {"method": "farsight", "mode": "B"}, ["kvsmooth", PRUNE])
#: The runs with prefix-cache and preemption checks: (specs, tokens per row, preempt every this many
#: steps, this many times). FLASH_ATTN is cheap with the torch stand-ins; TRITON_ATTN's interpreter is not.
PREEMPTION: dict[str, tuple[tuple[Any, ...], int, int, int]] = {
    "FLASH_ATTN3": (PREEMPTED, 8, 3, 4),
    "FLASH_ATTN3_V2": (PREEMPTED, 8, 3, 4),
    "TRITON_ATTN_V2": (TRITON_PREEMPTED, 5, 2, 2),
}


def preempted_cases(key: str) -> tuple[tuple[int, Any, int], ...]:
    """(image seed, method spec, max tokens) of each row of ``key``'s preempted batch."""
    specs, max_tokens, _, _ = PREEMPTION[key]
    return tuple((60 + i, s, max_tokens) for i, s in enumerate(specs))


def cases_of(key: str) -> tuple[tuple[int, Any], ...]:
    """The mixed batch of one run (``FLASH_ATTN3``, ``TRITON_ATTN``, ``FLASH_ATTN3_V2``,
    ``TRITON_ATTN_V2``: V2 refuses the reclaim at admission, so it is sent on its own there)."""
    if key == "TRITON_ATTN":
        return TRITON_CASES + TRITON_MORE
    if key == "TRITON_ATTN_V2":
        return TRITON_V2_CASES
    return tuple(c for c in CASES if c[1] is not RECLAIM) if key.endswith("_V2") else CASES


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", default=[r[0] for r in RUNS])
    parser.add_argument("--no-plugin", nargs="*", default=list(NO_PLUGIN))
    args = parser.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["HALLUGUARD_VERIFY_NATIVE"] = "1"  # native rows = the native kernel over the whole batch
    os.environ["HALLUGUARD_ATTENTION"] = "triton"  # reworked rows by the project's kernel, as on a GPU
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the V1 runner first (V2 would refuse the reclaim)
    apply()
    from helpers import fa_ops
    from helpers.parity import Case, make_llm, run_vllm
    from helpers.sync_sentinel import SyncSentinel, sync_counts
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY
    from vllm_halluguard.engine.runtime import worker_stats

    result: dict[str, Any] = {}
    engines: list[Any] = []  # kept alive: a collected engine would tear down the process's parallel groups
    no_plugin = _without_plugin([k for k in args.runs if k in args.no_plugin], engines)
    for key, backend, version, v2 in RUNS:
        if key not in args.runs:
            continue
        start = time.monotonic()
        select(backend, version or 3)
        overrides = _v2_async() if v2 else {}
        fa_ops.CALLS.clear()
        llm = make_llm("llava", block_size=16, **overrides)
        engines.append(llm)
        cases = [
            Case("llava", seed, max_tokens=MAX_TOKENS, extra_args=None if s is None else {EXTRA_ARGS_KEY: s})
            for seed, s in cases_of(key)
        ]
        sentinel = SyncSentinel()
        with sentinel.engine():  # host syncs of the plugin's layer calls and step plans
            gens = run_vllm(llm, cases)
        run_vllm(llm, [Case("llava", None, max_tokens=1)])  # delivers the finished ids to the worker
        (stats,) = llm.collective_rpc(worker_stats)
        result[key] = {
            "engine": _engine_mode(llm),
            "backends": llm.collective_rpc(backend_names)[0],
            "fa_versions": llm.collective_rpc(impl_versions)[0],
            "stats": stats,
            "syncs": sync_counts(sentinel),
            "fa_calls": sorted({f"{op}:{dt}:{sched}" for op, dt, sched in fa_ops.CALLS}),
            "gens": [
                {
                    "token_ids": g.token_ids,
                    "logprobs": [{str(k): v for k, v in s.items()} for s in g.logprobs],
                }
                for g in gens
            ],
        }
        if key in PREEMPTION:  # each FLASH_ATTN run; TRITON_ATTN's interpreter only on V2, a small batch
            result[key].update(prefix_cache=_prefix_cache(llm), preemption=_preemption(llm, key))
        if v2:
            result[key]["reclaim_refusal"] = _refusal(llm)
        if key in no_plugin:
            result[key]["no_plugin"] = no_plugin[key]
        result[key]["seconds"] = round(time.monotonic() - start, 1)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def _without_plugin(keys: list[str], engines: list[Any]) -> dict[str, Any]:
    """The plain rows of each run in ``keys`` on an engine without the plugin (same backend, stand-ins,
    runner and scheduling). vLLM loads general plugins once per process (``vllm.plugins.plugins_loaded``)
    and only those named in ``VLLM_PLUGINS``: these engines start first with a list naming no plugin;
    then the list is dropped, the envs cache cleared and the flag reset, so the next engine loads the
    plugin. Each result records the backend class its layers ran and whether the plugin was
    registered, which the test checks."""
    import time

    import vllm.plugins

    from helpers.parity import Case, make_llm, run_vllm
    from vllm_halluguard import plugin

    out: dict[str, Any] = {}
    if not keys:
        return out
    allowed = os.environ.get("VLLM_PLUGINS")
    os.environ["VLLM_PLUGINS"] = "none-at-all"
    order = sorted((r for r in RUNS if r[0] in keys), key=lambda r: r[3])  # V1 engines, then V2
    for key, backend, version, v2 in order:
        start = time.monotonic()
        select(backend, version or 3)
        llm = make_llm("llava", block_size=16, **(_v2_async() if v2 else {}))
        engines.append(llm)
        plain = [Case("llava", seed, max_tokens=MAX_TOKENS) for seed, spec in cases_of(key) if spec is None]
        gens = run_vllm(llm, plain)
        out[key] = {
            "engine": _engine_mode(llm),
            "backends": llm.collective_rpc(backend_names)[0],
            "registered": plugin.is_registered(),
            "gens": [
                {
                    "token_ids": g.token_ids,
                    "logprobs": [{str(k): v for k, v in s.items()} for s in g.logprobs],
                }
                for g in gens
            ],
            "seconds": round(time.monotonic() - start, 1),
        }
    from vllm import envs

    if allowed is None:
        del os.environ["VLLM_PLUGINS"]
    else:
        os.environ["VLLM_PLUGINS"] = allowed
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the plugin's runs start on V1
    envs.disable_envs_cache()
    vllm.plugins.plugins_loaded = False
    return out


def _prefix_cache(llm: Any) -> dict[str, int]:
    """Cached prompt tokens of a sequence of requests on one image (each after the previous)."""
    from helpers.parity import Case, sampling_params, vllm_inputs
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY

    llm.reset_prefix_cache()
    seq = {"plain": None, "plain_again": None, "kvsmooth": "kvsmooth", "kvsmooth_again": "kvsmooth",
           "farsight_b": {"method": "farsight", "mode": "B"}, "plain_last": None}  # fmt: skip
    from transformers import AutoProcessor

    from vllm_halluguard.tiny_models import ensure_fixture

    processor = AutoProcessor.from_pretrained(ensure_fixture("llava"))
    cached = {}
    for label, spec in seq.items():
        case = Case("llava", 40, max_tokens=2, extra_args=None if spec is None else {EXTRA_ARGS_KEY: spec})
        out = llm.generate([vllm_inputs(processor, case)], [sampling_params(case)], use_tqdm=False)[0]
        cached[label] = out.num_cached_tokens or 0
    return cached


def _v2_async() -> dict[str, Any]:
    """Switch the engines started from now on to the V2 runner with async scheduling (vLLM 0.32's
    defaults on Hopper). ``VllmConfig.use_v2_model_runner`` reads ``VLLM_USE_V2_MODEL_RUNNER`` through
    ``vllm.envs``, which the first engine core froze (``enable_envs_cache``); the cache is dropped so
    the next engine reads the new value (and freezes it again)."""
    from vllm import envs

    from helpers import engine_modes

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    envs.disable_envs_cache()
    engine_modes.keep_explicit_async_scheduling_on_cpu()
    return {"async_scheduling": True}


def _engine_mode(llm: Any) -> dict[str, Any]:
    """The runner and scheduler an engine really runs."""
    core = llm.llm_engine.engine_core.engine_core
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    return {
        "v2": isinstance(runner, V2Runner),
        "scheduler": type(core.scheduler).__name__,
        "batch_queue": core.batch_queue is not None,
    }


def _refusal(llm: Any) -> str:
    """The error of a request for PruneHal's reclaiming variant (refused at admission on V2)."""
    from helpers.parity import Case, run_vllm
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY

    try:
        run_vllm(llm, [Case("llava", 86, max_tokens=2, extra_args={EXTRA_ARGS_KEY: RECLAIM})])
    except Exception as exc:  # the message is the result
        return f"{type(exc).__name__}: {exc}"
    return ""


def _preemption(llm: Any, key: str) -> dict[str, Any]:
    """``key``'s preempted batch (:data:`PREEMPTION`) stepped on ``llm`` while vLLM preempts every running
    request at every ``every``-th step, ``times`` times (``reset_prefix_cache(reset_running_requests=True)``:
    recompute preemption). The rows' tokens and log-probs are compared with the dense reference by the test
    (as the mixed batch's are), which the same batch without preemption also equals: no second run of it
    here."""
    from transformers import AutoProcessor

    from helpers.parity import Case, run_vllm, sampling_params, vllm_inputs
    from vllm_halluguard.engine.keys import EXTRA_ARGS_KEY
    from vllm_halluguard.engine.runtime import worker_stats
    from vllm_halluguard.tiny_models import ensure_fixture

    def stats() -> dict[str, float]:
        run_vllm(llm, [Case("llava", None, max_tokens=1)])  # delivers the finished ids to the worker
        return dict(llm.collective_rpc(worker_stats)[0])

    _, _, every, times = PREEMPTION[key]
    cases = [
        Case("llava", seed, max_tokens=n, extra_args=None if s is None else {EXTRA_ARGS_KEY: s})
        for seed, s, n in preempted_cases(key)
    ]
    processor = AutoProcessor.from_pretrained(ensure_fixture("llava"))
    before = stats()["preempted"]
    engine = llm.llm_engine
    for i, case in enumerate(cases):
        engine.add_request(f"p{i}", vllm_inputs(processor, case), sampling_params(case))
    done: dict[str, Any] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                comp = out.outputs[0]
                done[out.request_id] = {
                    "token_ids": list(comp.token_ids),
                    "logprobs": [{str(t): lp.logprob for t, lp in s.items()} for s in comp.logprobs or []],
                }
        step += 1
        if step % every == 0 and step // every <= times:  # bounded: a replay catching up must get to finish
            llm.reset_prefix_cache(reset_running_requests=True)
    after = stats()
    return {
        "stats": after,
        "preempted": after["preempted"] - before,
        "batch": [done[f"p{i}"] for i in range(len(cases))],
    }


if __name__ == "__main__":
    main()
