"""``GET /v1/mitigations`` content (``Resolver.describe``): preset provenance next to the defaults."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoConfig

from server.mitigation import Policy, Resolver
from vllm_halluguard.methods import METHODS
from vllm_halluguard.testing.tiny_models import ensure_fixture


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
