"""vLLM's own attention backends, wrapped: native first, mitigated rows partitioned out.

:func:`wrap` subclasses the backend vLLM selects for the platform (``CPU_ATTN`` on CPU,
``FLASH_ATTN`` or ``TRITON_ATTN`` on NVIDIA GPUs) with the same name, layouts, kernels and CUDA-graph
support. Its builder returns vLLM's metadata untouched for a step without mitigated rows, so plain
traffic runs exactly as without the plugin; for a step with mitigated rows it returns a
:class:`~vllm_halluguard.engine.plan.StepPlan`, and its impl runs each layer through
:func:`vllm_halluguard.engine.execute.run_layer` (native sub-batches, then the methods).

Registered over the native names by :func:`vllm_halluguard.engine.hooks.install_backends`; the classes
are made on first use (``HG_CPU_ATTN``, ``HG_FLASH_ATTN``, ``HG_TRITON_ATTN`` attributes of this
module), so a platform only imports its own native backend.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

#: The native backends the plugin wraps (attribute of this module -> vLLM backend name).
WRAPPED = {"HG_CPU_ATTN": "CPU_ATTN", "HG_FLASH_ATTN": "FLASH_ATTN", "HG_TRITON_ATTN": "TRITON_ATTN"}
#: See :data:`vllm_halluguard.engine.execute.VERIFY_ENV`.
VERIFY_ENV = "HALLUGUARD_VERIFY_NATIVE"
#: ``triton`` makes the CPU engine rework mitigated rows with the Triton kernel (interpreted, with
#: ``TRITON_INTERPRET=1``) instead of the torch path: the GPU code path, testable on CPU.
ATTENTION_ENV = "HALLUGUARD_ATTENTION"


def rework_engine() -> str:
    """``"kernel"`` (the project's Triton kernel) on GPUs or in CPU test mode, else ``"torch"``."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "kernel"
    choice = os.environ.get(ATTENTION_ENV, "native")
    if choice not in ("native", "triton"):
        raise ValueError(f"{ATTENTION_ENV} must be 'native' or 'triton', got {choice!r}")
    return "kernel" if choice == "triton" else "torch"


class BuilderMixin:
    """Metadata builder: native metadata for plain steps, a :class:`StepPlan` for mitigated ones."""

    _hg_native_sinks: bool = False

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # type: ignore[call-arg]
        from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

        from vllm_halluguard.engine.hooks import ensure_runner_hook

        ensure_runner_hook()
        self._hg_decoder = isinstance(kv_cache_spec, FullAttentionSpec) and not isinstance(
            kv_cache_spec, MLAAttentionSpec
        )
        self._hg_kernel = rework_engine() == "kernel"
        self._hg_num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        from vllm_halluguard.engine.base import Backend
        from vllm_halluguard.engine.plan import build_plan
        from vllm_halluguard.engine.state import current

        parent = super().build  # type: ignore[misc]
        runtime = current()
        cm = common_attn_metadata
        view = runtime.view_for(cm.num_reqs) if runtime is not None and self._hg_decoder else None
        if view is None:
            return parent(common_prefix_len, cm, fast_build)
        backend = Backend(
            kernel=self._hg_kernel,
            native_sinks=self._hg_native_sinks and not isinstance(cm.causal, torch.Tensor),
            num_layers=runtime.num_layers,
            num_heads=self._hg_num_heads,
        )
        verify = os.environ.get(VERIFY_ENV) == "1"
        return build_plan(lambda prefix, common: parent(prefix, common, fast_build), common_prefix_len, cm,
                          view, backend, runtime.stats, verify)  # fmt: skip


class ImplMixin:
    """Attention impl: the native forward for plain steps, the partition for mitigated ones."""

    _hg_backend_name: str = ""

    def forward(self, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any, attn_metadata: Any,
                output: Any, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        from vllm_halluguard.engine.execute import run_layer
        from vllm_halluguard.engine.plan import StepPlan

        native = super().forward  # type: ignore[misc]
        if not isinstance(attn_metadata, StepPlan):
            return native(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        return run_layer(
            self, native, layer, query, key, value, kv_cache, attn_metadata, output, args, kwargs
        )


def wrap(native: type, backend_name: str) -> type:
    """The plugin's subclass of the native backend class ``native`` (vLLM name ``backend_name``)."""
    if getattr(native, "forward_includes_kv_cache_update", False):
        raise NotImplementedError(f"halluguard cannot wrap {backend_name}: its forward writes the KV cache")
    builder = native.get_builder_cls()
    impl = native.get_impl_cls()
    hg_builder = type(f"HG{builder.__name__}", (BuilderMixin, builder), {
        "_hg_native_sinks": backend_name == "CPU_ATTN" or bool(native.supports_sink()),
    })  # fmt: skip
    hg_impl = type(f"HG{impl.__name__}", (ImplMixin, impl), {"_hg_backend_name": backend_name})
    return type(f"HG{native.__name__}", (native,), {
        "__module__": __name__,
        "__doc__": f"{backend_name} with per-request hallucination mitigation (vllm-halluguard).",
        "halluguard_native": native,
        "get_builder_cls": staticmethod(lambda: hg_builder),
        "get_impl_cls": staticmethod(lambda: hg_impl),
    })  # fmt: skip


@functools.cache
def wrapped(backend_name: str) -> type:
    """The wrapped class of vLLM's backend ``backend_name`` (its original class, not an override)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    native = resolve_obj_by_qualname(AttentionBackendEnum[backend_name].value)
    return wrap(native, backend_name)


def is_wrapped(backend: type) -> bool:
    return "halluguard_native" in getattr(backend, "__dict__", {})


def __getattr__(name: str) -> type:
    if name in WRAPPED:
        return wrapped(WRAPPED[name])
    raise AttributeError(name)
