"""The request contract: one function turns a spec into the served config or a typed error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_halluguard.methods import FarSightConfig, KVSmoothConfig, SpecError
from vllm_halluguard.methods.resolve import MAX_KVSMOOTH_WINDOW, resolve


def _hf(model_type: str = "llava", layers: int = 4) -> SimpleNamespace:
    text = SimpleNamespace(num_hidden_layers=layers)
    return SimpleNamespace(model_type=model_type, get_text_config=lambda: text)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (42, "invalid_spec"),
        ({"lam": 1.1}, "invalid_spec"),
        ({"method": 3}, "invalid_spec"),
        ("kvsmoothh", "unknown_method"),
        ({"method": "kvsmooth", "window": 0}, "invalid_params"),
        ({"method": "kvsmooth", "bogus": 1}, "invalid_params"),
        ({"method": "none", "x": 1}, "invalid_params"),
        ({"method": "scr", "layers": [99]}, "invalid_params"),
        ({"method": "farsight", "mode": "A"}, "unsupported"),
        ({"method": "kvsmooth", "window": MAX_KVSMOOTH_WINDOW + 1}, "unsupported"),
    ],
)
def test_every_failure_has_a_machine_readable_reason(spec, reason):
    with pytest.raises(SpecError) as err:
        resolve(spec, _hf())
    assert err.value.reason == reason, err.value


def test_model_and_cache_reasons():
    with pytest.raises(SpecError) as err:
        resolve("kvsmooth", _hf("mistral"))
    assert err.value.reason == "model"
    with pytest.raises(SpecError) as err:
        resolve("kvsmooth", _hf(), kv_cache_dtype="fp8")
    assert err.value.reason == "kv_cache"


def test_resolution_fills_presets_for_the_model_and_serves_farsight_c_by_default():
    assert resolve(None, _hf()) is None and resolve("none", _hf()) is None
    cfg = resolve("kvsmooth", _hf(layers=4))
    assert isinstance(cfg, KVSmoothConfig) and cfg.is_resolved() and max(cfg.layers) < 4
    assert resolve("farsight", _hf()).mode == "C"  # the served default (closest to the paper's A)
    assert resolve({"method": "farsight", "mode": "B"}, _hf()).mode == "B"
    explicit = FarSightConfig(mode="B")
    assert resolve(explicit, _hf()).mode == "B", "a config object's explicit mode is kept"
    assert resolve(FarSightConfig(), _hf()).mode == "C"
