"""A worker runtime without an engine: what ``Runtime`` reads of vLLM's config and of a runner's
request records, for the tests of the worker's per-step host work."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vllm_halluguard.engine.runtime import Runtime
from vllm_halluguard.methods import FarSightConfig, KVSmoothConfig, PruneHalConfig

LAYERS, HEADS, IMAGE_TOKEN = 4, 4, 99
FARSIGHT_C = FarSightConfig(mode="C", layers=tuple(range(LAYERS)))
KVSMOOTH = KVSmoothConfig(lam_ref=0.5, layers=(1, 2))
PRUNEHAL = PruneHalConfig(r=0.5, t=2, layers=(1, 2, 3))


def make_runtime(capacity: int = 16) -> Runtime:
    """A worker runtime for a 4-layer, 4-head model (what ``Runtime`` reads of vLLM's config)."""
    text = SimpleNamespace(num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    hf = SimpleNamespace(model_type="llava", image_token_id=IMAGE_TOKEN, get_text_config=lambda: text)
    return Runtime(
        SimpleNamespace(
            model_config=SimpleNamespace(hf_config=hf),
            scheduler_config=SimpleNamespace(max_num_seqs=capacity),
            cache_config=SimpleNamespace(block_size=16),
        )
    )


def cached(req_id: str, cfg=None, prompt: list[int] | None = None, computed: int = 0):
    """A runner's request record (the fields of V1's ``CachedRequestState`` the runtime reads)."""
    extra = None if cfg is None else {"halluguard": cfg.canonical()}
    return SimpleNamespace(
        req_id=req_id,
        sampling_params=SimpleNamespace(extra_args=extra),
        prompt_token_ids=prompt if prompt is not None else [1] * 10,
        mm_features=None,
        num_computed_tokens=computed,
    )


def v2_graph_manager(mode: Any) -> Any:
    """vLLM's V2 ``CudaGraphManager`` with the candidates vLLM builds for ``mode`` and sizes 1..8, as if
    captured. Its ``__init__`` needs the distributed groups of a running worker; the fields it sets that
    ``dispatch`` and ``_init_candidates`` read are set here instead."""
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    config = VllmConfig()
    cc = config.compilation_config
    cc.cudagraph_mode, cc.cudagraph_capture_sizes, cc.max_cudagraph_capture_size = mode, [1, 2, 4, 8], 8
    m = object.__new__(CudaGraphManager)
    m.vllm_config, m.compilation_config, m.cudagraph_mode = config, cc, mode
    m.max_num_reqs, m.decode_query_len, m.varlen_decode = config.scheduler_config.max_num_seqs, 1, False
    m.ubatch_runner, m.lora_capture_cases, m._lora_dispatch_map, m._max_lora_case = None, [0], {}, 0
    m._candidates, m._capture_descs = {}, {}
    m._init_candidates()
    m._graphs_captured = True
    return m
