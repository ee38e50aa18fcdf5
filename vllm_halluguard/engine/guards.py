"""What the model runners' hooks check, on both runners (V1 in :mod:`.hooks`, V2 in :mod:`.runner_v2`):
which backends the plugin wraps, and which CUDA-graph modes a step must not use. No engine imports,
so that both hook modules can use it."""

from __future__ import annotations

from typing import Any

#: Set to 1 to compare, in every mitigated step, the native rows' outputs with the native kernel's over
#: the whole batch (:func:`vllm_halluguard.engine.execute.run_layer`; tests). They are bit-identical only
#: where vLLM's kernel is batch-invariant (:func:`vllm_halluguard.engine.execute.native_exact`).
VERIFY_ENV = "HALLUGUARD_VERIFY_NATIVE"

#: vLLM backend names the plugin wraps, and the attribute of :mod:`.backends` that wraps each.
BACKENDS = {"CPU_ATTN": "HG_CPU_ATTN", "FLASH_ATTN": "HG_FLASH_ATTN", "TRITON_ATTN": "HG_TRITON_ATTN"}

#: The class attribute that marks a backend class made by :func:`.backends.wrap`.
WRAPPED_MARK = "halluguard_native"


def is_wrapped(backend: type) -> bool:
    """Whether ``backend`` is one of the plugin's wrapped backend classes."""
    return WRAPPED_MARK in getattr(backend, "__dict__", {})


def unsupported_backends(attn_groups: Any) -> list[str]:
    """Names of the decoder-attention backends of a runner's groups that the plugin does not wrap."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    bad = set()
    for groups in attn_groups:
        for group in groups:
            spec = group.kv_cache_spec
            decoder = isinstance(spec, FullAttentionSpec) and not isinstance(spec, MLAAttentionSpec)
            if decoder and not is_wrapped(group.backend):
                bad.add(group.backend.get_name())
    return sorted(bad)


def refuse_unsupported_backends(attn_groups: Any) -> None:
    """Fail the model runner's startup if its decoder layers got a backend the plugin does not wrap."""
    bad = unsupported_backends(attn_groups)
    if bad:
        raise RuntimeError(
            f"vllm-halluguard wraps the attention backends {', '.join(BACKENDS)}, but this model's "
            f"decoder layers use {', '.join(bad)}: start vLLM with --attention-backend FLASH_ATTN "
            f"or TRITON_ATTN, or without the plugin (VLLM_PLUGINS excluding 'halluguard')"
        )


def invalid_cudagraph_modes(runtime: Any) -> set[Any] | None:
    """CUDA-graph modes a step must not use: full graphs when some mitigated row needs the plugin in
    attention this step (the per-layer partition is Python in the attention call, which a full graph
    would skip), else none. Decided on host data before the dispatch (``Runtime.update``)."""
    step = None if runtime is None else runtime.step
    if step is None or not step.needs_attention:
        return None
    from vllm.config import CUDAGraphMode

    return {CUDAGraphMode.FULL}
