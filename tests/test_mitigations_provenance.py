"""``GET /v1/mitigations`` content (``Resolver.describe``): preset provenance next to the defaults;
the served architectures' presets and refusals, and their ``--fixture``."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoConfig

from vllm_halluguard.methods import METHODS
from vllm_halluguard.methods.errors import SpecError
from vllm_halluguard.methods.resolve import resolve
from vllm_halluguard.server.mitigation import Policy, Resolver
from vllm_halluguard.tiny_models import SERVED_FIXTURES, ensure_fixture


@pytest.fixture(scope="module")
def llava_config():
    return AutoConfig.from_pretrained(ensure_fixture("llava"))


def _rows(hf_config) -> dict:
    return {row["method"]: row for row in Resolver(Policy(), hf_config).describe()["data"]}


def test_tiny_model_presets_are_extrapolated(llava_config) -> None:
    rows = _rows(llava_config)
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        prov = row["provenance"]
        assert prov and set(prov.values()) == {"extrapolated"}, name
        assert set(prov) <= set(row["defaults"]), name  # every marked field is shown in the defaults


def test_llava_13b_depth_reports_scr_paper_ranges(llava_config) -> None:
    deep = copy.deepcopy(llava_config)
    deep.get_text_config().num_hidden_layers = 40  # LLaVA-1.5-13B's depth
    rows = _rows(deep)
    scr = rows["scr"]
    assert scr["provenance"] == {"diag_layers": "paper", "layers": "paper"}
    assert scr["defaults"]["diag_layers"] == list(range(8, 17))
    assert scr["defaults"]["layers"] == list(range(12))
    assert set(rows["prunehal"]["provenance"].values()) == {"paper"}
    assert set(rows["kvsmooth"]["provenance"].values()) == {"extrapolated"}  # KVSmooth: 7B only


#: Decoder depth of each served architecture's common 7B/8B model: no paper gives values for any.
SERVED_DEPTHS = {"qwen2_5_vl": 28, "qwen3_vl": 36, "llava_next": 32, "llava_onevision": 28}


@pytest.mark.parametrize("fixture", SERVED_FIXTURES)
def test_served_architectures_are_extrapolated_at_real_depth_and_refuse_what_does_not_apply(fixture) -> None:
    config = copy.deepcopy(AutoConfig.from_pretrained(ensure_fixture(fixture)))
    config.get_text_config().num_hidden_layers = SERVED_DEPTHS[fixture]
    described = Resolver(Policy(), config).describe()
    assert described["model_family"] == fixture
    rows = {row["method"]: row for row in described["data"]}
    for name, row in rows.items():
        assert set(row["provenance"].values()) == {"extrapolated"}, (fixture, name)
    tiled = fixture in ("llava_next", "llava_onevision")
    assert (rows["scr"]["defaults"] is None) == tiled, "scr is refused exactly on tiled images"
    with pytest.raises(SpecError) as err:
        resolve("scr", config) if tiled else resolve("scr", config, kv_cache_dtype="fp8")
    assert err.value.reason == ("unsupported" if tiled else "kv_cache")
    assert resolve("prunehal", config).layers == tuple(range(SERVED_DEPTHS[fixture]))


def test_models_without_presets_are_refused_with_reason_model() -> None:
    config = copy.deepcopy(AutoConfig.from_pretrained(ensure_fixture("llava")))
    config.model_type = "gemma3"
    with pytest.raises(SpecError, match="gemma3") as err:
        resolve("kvsmooth", config)
    assert err.value.reason == "model"


@pytest.mark.parametrize("fixture", SERVED_FIXTURES)
def test_server_cli_serves_the_fixture(fixture) -> None:
    from vllm_halluguard.server.cli import build_serve_argv

    argv = build_serve_argv(["--fixture", fixture, "--port", "8001"])
    assert argv[:2] == ["serve", str(ensure_fixture(fixture))]
    assert argv[argv.index("--served-model-name") + 1] == f"tiny-{fixture}"


def test_reference_refuses_scr_on_tiled_images_when_it_attaches() -> None:
    from vllm_halluguard import reference
    from vllm_halluguard.tiny_models import load_hf

    model, _ = load_hf("llava_next")
    with pytest.raises(ValueError, match="one patch grid"), reference.apply(model, "scr"):
        pass
    with reference.apply(model, "prunehal") as ref:  # the other methods attach
        assert ref.config.layers == tuple(range(4))
