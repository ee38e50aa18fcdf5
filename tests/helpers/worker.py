"""A worker runtime without an engine: what ``Runtime`` reads of vLLM's config and of a runner's
request records, for the tests of the worker's per-step host work."""

from __future__ import annotations

from types import SimpleNamespace

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
