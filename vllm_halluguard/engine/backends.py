"""vLLM's own attention backends, wrapped: native first, mitigated rows partitioned out.

:func:`wrap` subclasses the backend vLLM selects for the platform (``CPU_ATTN`` on CPU,
``FLASH_ATTN`` or ``TRITON_ATTN`` on NVIDIA GPUs) with the same name, layouts, kernels and CUDA-graph
support, adding :class:`~vllm_halluguard.engine.plan.BuilderMixin` to its metadata builder and
:class:`~vllm_halluguard.engine.execute.ImplMixin` to its impl. The builder returns vLLM's metadata
untouched for a step without mitigated rows, so plain traffic runs exactly as without the plugin;
for a step with mitigated rows it returns a :class:`~vllm_halluguard.engine.plan.StepPlan`, which the
impl runs layer by layer (native sub-batches, then the methods).

Registered over the native names by :func:`vllm_halluguard.engine.hooks.install_backends`; the classes
are made on first use (``HG_CPU_ATTN``, ``HG_FLASH_ATTN``, ``HG_TRITON_ATTN`` attributes of this
module), so a platform only imports its own native backend. Each class also resolves under its own
name (``HGFlashAttentionBackend`` ...): the CUDA platform hands the selector
``cls.__module__ + "." + cls.__qualname__`` of the class it picked (``vllm/platforms/cuda.py``,
``_backend_cls_path``), which ``resolve_obj_by_qualname`` looks up in this module.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_halluguard.engine.execute import ImplMixin
from vllm_halluguard.engine.guards import WRAPPED_MARK
from vllm_halluguard.engine.plan import BuilderMixin

#: The native backends the plugin wraps (attribute of this module -> vLLM backend name).
WRAPPED = {"HG_CPU_ATTN": "CPU_ATTN", "HG_FLASH_ATTN": "FLASH_ATTN", "HG_TRITON_ATTN": "TRITON_ATTN"}
#: Query heads per rank up to which FLASH_ATTN takes per-head sinks: FA3's ``mha_fwd`` refuses ``s_aux``
#: above 64 (vllm-project/flash-attention ``hopper/flash_api.cpp``: "We only support query heads <= 64
#: with S aux"). Applied to FLASH_ATTN whatever its version (FA4's limit is not checked).
FA_SINK_HEADS_MAX = 64
#: The wrapped classes' own names (``HG`` + the native class name) -> vLLM backend name.
CLASS_NAMES = {
    "HGCPUAttentionBackend": "CPU_ATTN",
    "HGFlashAttentionBackend": "FLASH_ATTN",
    "HGTritonAttentionBackend": "TRITON_ATTN",
}


def _builder_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """A wrapped builder is made in a worker only: follow its model runner's steps from there on."""
    from vllm_halluguard.engine.runners import ensure_runner_hook

    ensure_runner_hook()
    BuilderMixin.__init__(self, *args, **kwargs)


def wrap(native: Any, backend_name: str) -> type:
    """The plugin's subclass of the native backend class ``native`` (vLLM name ``backend_name``)."""
    if getattr(native, "forward_includes_kv_cache_update", False):
        raise NotImplementedError(f"halluguard cannot wrap {backend_name}: its forward writes the KV cache")
    builder = native.get_builder_cls()
    impl = native.get_impl_cls()
    hg_builder = type(f"HG{builder.__name__}", (BuilderMixin, builder), {
        "__init__": _builder_init,
        "_hg_native_sinks": backend_name == "CPU_ATTN" or bool(native.supports_sink()),
        "_hg_sink_heads_max": FA_SINK_HEADS_MAX if backend_name == "FLASH_ATTN" else None,
    })  # fmt: skip
    hg_impl = type(f"HG{impl.__name__}", (ImplMixin, impl), {"_hg_backend_name": backend_name})
    return type(f"HG{native.__name__}", (native,), {
        "__module__": __name__,
        "__doc__": f"{backend_name} with per-request hallucination mitigation (vllm-halluguard).",
        WRAPPED_MARK: native,
        "get_builder_cls": staticmethod(lambda: hg_builder),
        "get_impl_cls": staticmethod(lambda: hg_impl),
    })  # fmt: skip


@functools.cache
def wrapped(backend_name: str) -> type:
    """The wrapped class of vLLM's backend ``backend_name`` (its original class, not an override)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    native = resolve_obj_by_qualname(AttentionBackendEnum[backend_name].value)
    cls = wrap(native, backend_name)
    if CLASS_NAMES.get(cls.__qualname__) != backend_name:  # vLLM renamed its class: the CUDA path breaks
        raise RuntimeError(f"{cls.__qualname__} is missing from CLASS_NAMES (wrapping {backend_name})")
    return cls


def __getattr__(name: str) -> type:
    if name in WRAPPED:
        return wrapped(WRAPPED[name])
    if name in CLASS_NAMES:
        return wrapped(CLASS_NAMES[name])
    raise AttributeError(name)
