"""Registry, parsing, validation, presets and depth scaling of the method configs."""

from __future__ import annotations

import json
import math

import pytest

from vllm_halluguard.methods import (
    METHODS,
    FarSightConfig,
    KVSmoothConfig,
    PruneHalConfig,
    SCRConfig,
    parse,
    scale_layer_range,
)
from vllm_halluguard.methods.base import parse_layer_spec


def test_registry_names() -> None:
    assert set(METHODS) == {"kvsmooth", "prunehal", "farsight", "scr"}
    for name, cls in METHODS.items():
        assert cls.name == name


@pytest.mark.parametrize("spec", [None, "none", "NONE", {"method": "none"}])
def test_parse_none(spec: object) -> None:
    assert parse(spec) is None


def test_parse_forms() -> None:
    assert parse("kvsmooth") == KVSmoothConfig()
    assert parse({"method": "scr", "lam": 1.2, "top_k": 8}) == SCRConfig(lam=1.2, top_k=8)
    cfg = PruneHalConfig(r=0.5, t=2)
    assert parse(cfg) is cfg


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("dola", "unknown method 'dola'"),
        ({"lam": 1.1}, "no 'method' key"),
        ({"method": "scr", "lam": 0.5}, "lam"),
        ({"method": "scr", "bogus": 1}, "bogus"),
        ({"method": "prunehal", "r": 0.0}, "r"),
        ({"method": "prunehal", "r": 1.5}, "r"),
        ({"method": "kvsmooth", "lam_ref": 1.2}, "lam_ref"),
        ({"method": "kvsmooth", "layers": [1, 1]}, "duplicate"),
        ({"method": "kvsmooth", "layers": [-1]}, ">= 0"),
        ({"method": "farsight", "mode": "D"}, "mode"),
        ({"method": "farsight", "sigma": 0.0, "alibi": False}, "never decay"),
        ({"method": "farsight", "sigma": float("nan")}, "NaN"),
        ({"method": "none", "x": 1}, "no parameters"),
        (3, "cannot parse"),
    ],
)
def test_parse_errors(spec: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse(spec)


def test_configs_are_frozen() -> None:
    cfg = SCRConfig()
    with pytest.raises(ValueError):
        cfg.lam = 2.0  # type: ignore[misc]


def test_paper_defaults() -> None:
    assert KVSmoothConfig().clip == 0.2 and KVSmoothConfig().window == 15
    assert math.isclose(FarSightConfig().sigma, math.log(256) / math.log(1024))
    assert math.isclose(FarSightConfig().sigma, 0.8)
    scr = SCRConfig()
    assert (scr.lam, scr.top_k, scr.connectivity) == (1.10, 32, 8)
    p = PruneHalConfig.preset("llava", 32)
    assert (p.r, p.t, p.vote_frac, p.force_step) == (0.4, 3, 0.5, 2)
    q = PruneHalConfig.preset("qwen2_vl", 28)
    assert (q.r, q.t) == (0.9, 4)


def test_presets_at_paper_depth() -> None:
    # Paper ranges (0-based, inclusive) must come back unchanged on the models they were tuned on.
    assert KVSmoothConfig.preset("llava", 32).layers == tuple(range(3, 31))
    assert KVSmoothConfig.preset("llava", 32).lam_ref == 0.9
    scr = SCRConfig.preset("llava", 32)
    assert scr.diag_layers == tuple(range(8, 17)) and scr.layers == tuple(range(0, 12))
    scr_q = SCRConfig.preset("qwen2_vl", 28)
    assert scr_q.diag_layers == tuple(range(8, 17)) and scr_q.layers == tuple(range(0, 16))
    assert FarSightConfig.preset("llava", 32).layers == tuple(range(32))
    assert PruneHalConfig.preset("qwen2_vl", 28).layers == tuple(range(28))


def test_presets_scaled_to_tiny_models() -> None:
    # 4 layers: KVSmooth keeps an excluded first and last layer; SCR diagnoses after it intervenes.
    assert KVSmoothConfig.preset("llava", 4).layers == (1, 2)
    assert KVSmoothConfig.preset("qwen2_vl", 4).layers == (1, 2)
    assert SCRConfig.preset("llava", 4).diag_layers == (1,)
    assert SCRConfig.preset("llava", 4).layers == (0,)
    for fam in ("llava", "qwen2_vl"):
        for depth in (1, 2, 3, 4, 7, 13, 28, 32, 40, 80):
            for cls in METHODS.values():
                cfg = cls.preset(fam, depth)
                for field in cls.layer_fields:
                    layers = getattr(cfg, field)
                    assert layers and min(layers) >= 0 and max(layers) < depth, (cls.name, fam, depth)


def test_paper_values_at_paper_depths_are_not_scaled() -> None:
    # SCR gives LLaVA-1.5-13B (40 layers) the 7B ranges: diagnostic 8-16, intervention 0-11 (0-based,
    # inclusive), not the proportional 10-20 / 0-14.
    scr = SCRConfig.preset("llava", 40)
    assert scr.diag_layers == tuple(range(8, 17)) and scr.layers == tuple(range(0, 12))
    # PruneHal gives (0.4, 3) on all layers of LLaVA-1.5-7B and -13B.
    p = PruneHalConfig.preset("llava", 40)
    assert (p.r, p.t, p.layers) == (0.4, 3, tuple(range(40)))
    # A depth no paper gives still scales: SCR on a 64-layer LLaVA.
    assert SCRConfig.preset("llava", 64).diag_layers == tuple(range(16, 34))


PAPER_FIELDS = {  # docs: /work/shared/research/methods.md, per method and model the papers give
    ("kvsmooth", "llava", 32): {"lam_ref", "layers"},  # LLaVA-1.5-7B only
    ("prunehal", "llava", 32): {"r", "t", "layers"},  # LLaVA-1.5-7B/13B
    ("prunehal", "llava", 40): {"r", "t", "layers"},
    ("farsight", "llava", 32): {"layers"},  # the official code's LLaVA-1.5-7B
    ("scr", "llava", 32): {"diag_layers", "layers"},  # LLaVA-1.5-7B/13B, Qwen2-VL-7B
    ("scr", "llava", 40): {"diag_layers", "layers"},
    ("scr", "qwen2_vl", 28): {"diag_layers", "layers"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize(("family", "depth"), [("llava", 32), ("llava", 40), ("qwen2_vl", 28), ("llava", 4)])
def test_provenance_marks_paper_and_extrapolated_fields(name: str, family: str, depth: int) -> None:
    cls = METHODS[name]
    prov = cls.provenance(family, depth)  # type: ignore[arg-type]
    preset = cls.preset(family, depth)  # type: ignore[arg-type]
    assert prov and all(getattr(cls(), f) is None for f in prov)  # the fields the preset fills
    assert all(getattr(preset, f) is not None for f in prov)
    paper = PAPER_FIELDS.get((name, family, depth), set())
    assert {f for f, v in prov.items() if v == "paper"} == paper
    assert {f for f, v in prov.items() if v == "extrapolated"} == set(prov) - paper


def test_provenance_of_a_scaled_tiny_model_is_extrapolated() -> None:
    for cls in METHODS.values():
        for family in ("llava", "qwen2_vl"):
            assert set(cls.provenance(family, 4).values()) == {"extrapolated"}, cls.name


@pytest.mark.parametrize(
    ("start", "stop", "ref", "depth", "expected"),
    [
        (3, 31, 32, 32, range(3, 31)),  # identity
        (3, 31, 32, 4, range(1, 3)),  # ceil(3/8)=1 skipped in front, ceil(1/8)=1 at the back
        (3, 31, 32, 64, range(6, 62)),
        (0, 12, 32, 16, range(0, 6)),  # back margin 20 -> 10
        (8, 17, 32, 2, range(1, 2)),  # empty after rounding -> one layer
        (0, 32, 32, 5, range(0, 5)),
    ],
)
def test_scale_layer_range(start: int, stop: int, ref: int, depth: int, expected: range) -> None:
    assert scale_layer_range(start, stop, ref, depth) == tuple(expected)


def test_for_model_fills_and_checks() -> None:
    cfg = KVSmoothConfig(clip=0.1).for_model("llava", 32)
    assert cfg.layers == tuple(range(3, 31)) and cfg.lam_ref == 0.9 and cfg.clip == 0.1
    assert cfg.is_resolved()
    explicit = KVSmoothConfig(layers="0:2", lam_ref=0.5).for_model("llava", 4)
    assert explicit.layers == (0, 1) and explicit.lam_ref == 0.5
    with pytest.raises(ValueError, match="do not exist"):
        SCRConfig(layers=[0, 5]).for_model("llava", 4)
    with pytest.raises(ValueError, match="unknown model family"):
        SCRConfig().for_model("llama", 4)  # type: ignore[arg-type]


def test_layer_spec_parsing() -> None:
    assert parse_layer_spec("2:5") == (2, 3, 4)
    assert parse_layer_spec([4, 1]) == (1, 4)
    assert parse_layer_spec(range(2)) == (0, 1)
    for bad in ("3", "a:b", 3, [1.5]):
        with pytest.raises(ValueError):
            parse_layer_spec(bad)


def test_canonical_is_stable_and_distinct() -> None:
    a = parse({"method": "scr", "top_k": 8, "lam": 1.2})
    b = parse({"lam": 1.2, "method": "scr", "top_k": 8})
    assert a.canonical() == b.canonical()
    data = json.loads(a.canonical())
    assert data["method"] == "scr" and data["top_k"] == 8
    assert a.canonical() != SCRConfig(top_k=9, lam=1.2).canonical()
    # +inf survives the round trip (it must not collapse to null in cache salts).
    inf = FarSightConfig(sigma=math.inf).canonical()
    assert '"sigma":"Infinity"' in inf
    assert inf != FarSightConfig(sigma=0.5).canonical()


def test_is_noop() -> None:
    assert KVSmoothConfig(lam_ref=0.0, clip=0.0).is_noop()
    assert not KVSmoothConfig(lam_ref=0.0, clip=0.1).is_noop()
    assert PruneHalConfig(r=1.0, t=3).is_noop() and PruneHalConfig(r=0.4, t=0).is_noop()
    assert not PruneHalConfig(r=0.4, t=3).is_noop()
    assert FarSightConfig(sigma=math.inf).is_noop() and not FarSightConfig().is_noop()
    assert SCRConfig(top_k=0).is_noop() and SCRConfig(lam=1.0).is_noop() and not SCRConfig().is_noop()
