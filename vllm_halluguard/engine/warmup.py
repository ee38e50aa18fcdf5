"""Start-up compile of the Triton kernels' specialisations (:mod:`vllm_halluguard.kernels.warmup`, and
KVSmooth's update, :mod:`vllm_halluguard.kernels.kvsmooth_update`).

Both GPU model runners (V1 and V2) are warmed up by ``gpu_worker.Worker.compile_or_warm_up_model``,
after the KV caches are bound to the layers and before CUDA-graph capture and vLLM's JIT monitor.
:func:`install` runs :func:`warm_up` first there, in GPU workers only: the CPU worker overrides that
method, and on CPU the kernel only runs interpreted (``HALLUGUARD_ATTENTION=triton`` in tests), where
nothing compiles. Nothing else of vLLM's warm-up changes; plain serving never launches the kernel.
Set ``HALLUGUARD_KERNEL_WARMUP=0`` to skip the compile (kernels then compile on first use).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: ``0`` skips the start-up compile.
WARMUP_ENV = "HALLUGUARD_KERNEL_WARMUP"


def kernel_layers(runner: Any) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(num_heads, k_cache, v_cache)`` of each decoder layer whose wrapped backend the Triton kernel
    reads (the views :func:`~vllm_halluguard.engine.execute.run_layer` would pass it)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_halluguard.engine.cache_io import cache_io
    from vllm_halluguard.engine.execute import ImplMixin

    for layer in get_layers_from_vllm_config(runner.vllm_config, Attention).values():
        impl, kv_cache = layer.impl, layer.kv_cache
        if isinstance(kv_cache, list | tuple):  # one per virtual engine in some vLLM versions
            kv_cache = kv_cache[0] if kv_cache else None
        if not isinstance(impl, ImplMixin) or not isinstance(kv_cache, torch.Tensor) or not kv_cache.numel():
            continue
        table = torch.zeros(1, 1, dtype=torch.int32, device=kv_cache.device)
        views = cache_io(impl._hg_backend_name, kv_cache, table, layer, impl).kernel_views()
        if views is not None:
            yield layer.num_heads, views[0], views[1]


def _geometry(num_heads: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What a layer's launches specialise on (layers alike in it share their compiled kernels)."""
    return num_heads, k.dtype, k.shape[1:], k.stride(), v.stride(), k.data_ptr() % 16, v.data_ptr() % 16


def warm_up(runner: Any, mode: str = "compile") -> set:
    """Compile (``mode="compile"``) or list (``"record"``) every specialisation the engine can launch
    for ``runner``'s layers (the attention kernel's, :mod:`~vllm_halluguard.kernels.warmup`, and
    KVSmooth's update, :mod:`~vllm_halluguard.kernels.kvsmooth_update`); returns their keys. Nothing
    when the kernel path is off or ``HALLUGUARD_KERNEL_WARMUP=0``."""
    from vllm_halluguard.engine.plan import rework_engine
    from vllm_halluguard.engine.tp import tp_group
    from vllm_halluguard.kernels import kvsmooth_update
    from vllm_halluguard.kernels import triton_attention as ta
    from vllm_halluguard.kernels.warmup import launch_variants

    if rework_engine() != "kernel" or os.environ.get(WARMUP_ENV, "1") == "0":
        return set()
    start = time.perf_counter()
    seen: set[tuple] = set()
    with ta.record_launches(mode) as keys:  # type: ignore[arg-type]
        for num_heads, k, v in kernel_layers(runner):
            geometry = _geometry(num_heads, k, v)
            if geometry not in seen:
                seen.add(geometry)
                launch_variants(num_heads, k, v, split_kv=ta.num_sms(k.device) > 0)
                # KVSmooth's update (one specialisation per geometry; the head mean all-reduced in
                # torch under tensor parallelism, see engine/kvsmooth.py)
                kvsmooth_update.launch_variant(num_heads, k, v, z_given=tp_group().world_size > 1)
    if keys:
        logger.info(
            "halluguard: %s %d Triton kernel specialisations for %d layer geometries in %.1f s",
            "compiled" if mode == "compile" and not ta.INTERPRETED else "listed",
            len(keys), len(seen), time.perf_counter() - start,
        )  # fmt: skip
    return keys


@functools.cache
def install() -> None:
    """Run :func:`warm_up` at the start of the GPU worker's ``compile_or_warm_up_model`` (the CPU
    worker, a subclass, overrides that method: ``v1/worker/cpu_worker.py``)."""
    from vllm.v1.worker.gpu_worker import Worker

    warm_up_first(Worker)


def warm_up_first(worker_cls: Any) -> None:
    """Wrap ``worker_cls.compile_or_warm_up_model`` so that :func:`warm_up` runs before it."""
    original = worker_cls.compile_or_warm_up_model

    @functools.wraps(original)
    def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        warm_up(self.model_runner)
        return original(self, *args, **kwargs)

    worker_cls.compile_or_warm_up_model = compile_or_warm_up_model
