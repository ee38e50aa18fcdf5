"""``GET /v1/mitigations`` answers for this server: each method served or not (and why), from the checks
that refuse a request, and the composition pairs and rules from the same source.

Real ``VllmConfig`` objects stand for the server's settings; the tiny fixtures' HF configs for the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from transformers import AutoConfig
from vllm.config import CompilationConfig, VllmConfig

from vllm_halluguard.engine import requests as engine_requests
from vllm_halluguard.methods import METHODS, MODEL_FAMILIES, ORDER, MethodConfig, SpecError
from vllm_halluguard.methods.base import Refusal
from vllm_halluguard.server.mitigation import MitigationError, Policy, Resolver
from vllm_halluguard.tiny_models import ALL_FIXTURES, ensure_fixture

ALL_PAIRS = {f"{a}+{b}" for i, a in enumerate(ORDER) for b in ORDER[i + 1 :]}


@pytest.fixture(scope="module")
def hf() -> dict[str, Any]:
    return {f: AutoConfig.from_pretrained(ensure_fixture(f)) for f in ("llava", "llava_next")}


def eager(mode: int = 0) -> VllmConfig:
    return VllmConfig(compilation_config=CompilationConfig(mode=mode))


def listing(resolver: Resolver) -> tuple[dict[str, dict[str, Any]], set[str]]:
    body = resolver.describe()
    return {r["method"]: r for r in body["data"]}, set(body["composition"]["supported"])


def test_an_eager_llava_server_runs_every_method_and_pair(hf):
    rows, pairs = listing(Resolver(Policy(), hf["llava"], vllm_config=eager()))
    assert set(rows) == set(METHODS)
    assert all(r["engine_supported"] and r["unsupported_reason"] is None for r in rows.values())
    assert pairs == ALL_PAIRS


def test_scr_is_not_listed_where_the_model_refuses_it(hf):
    resolver = Resolver(Policy(), hf["llava_next"], vllm_config=eager())
    rows, pairs = listing(resolver)
    with pytest.raises(MitigationError) as refused:
        resolver.resolve("scr")
    assert rows["scr"]["engine_supported"] is False
    assert rows["scr"]["unsupported_reason"] == str(refused.value)
    assert all(rows[m]["engine_supported"] for m in METHODS if m != "scr")
    assert pairs == {p for p in ALL_PAIRS if "scr" not in p.split("+")}


def test_a_compiled_server_does_not_list_scr(hf):
    compiled = eager(mode=3)
    rows, pairs = listing(Resolver(Policy(), hf["llava"], vllm_config=compiled))
    assert rows["scr"]["engine_supported"] is False and "--enforce-eager" in rows["scr"]["unsupported_reason"]
    cfg = Resolver(Policy(), hf["llava"]).resolve("scr")
    with pytest.raises(SpecError, match="--enforce-eager") as e:  # admission refuses it the same way
        engine_requests.check_settings(cfg, compiled)
    assert e.value.reason == "unsupported" and str(e.value) == rows["scr"]["unsupported_reason"]
    assert all(rows[m]["engine_supported"] for m in METHODS if m != "scr")
    assert pairs == {p for p in ALL_PAIRS if "scr" not in p.split("+")}
    with pytest.raises(MitigationError, match="--enforce-eager"):  # a default it refuses stops the server
        Resolver(Policy(default="scr"), hf["llava"], vllm_config=compiled)


@pytest.mark.parametrize(
    ("spec", "setting"),
    [
        ([{"method": "farsight", "mode": "A"}, "kvsmooth"], "farsight mode 'A'"),
        (
            [{"method": "prunehal", "selection": "shared", "granularity": "block"}, "kvsmooth"],
            "prunehal selection 'shared' (the block-reclaiming variant)",
        ),
        (
            [{"method": "kvsmooth", "head_reduce": "entropy_of_mean"}, "prunehal"],
            "kvsmooth head_reduce 'entropy_of_mean' together with prunehal",
        ),
    ],
)
def test_the_note_names_each_setting_a_composition_refuses(hf, spec, setting):
    resolver = Resolver(Policy(), hf["llava"], vllm_config=eager())
    with pytest.raises(MitigationError) as e:
        resolver.resolve(spec)
    assert e.value.reason == "unsupported"
    note = resolver.describe()["composition"]["note"]
    assert setting in note


class _Unplaced(MethodConfig):
    """A registered method that declares no place in a composition (no ``compose_rank``)."""

    name: ClassVar[str] = "unplaced"
    composition_refusals: ClassVar[tuple[Refusal, ...]] = ()


def test_a_composition_with_a_method_that_has_no_place_is_a_400_not_a_500(hf, monkeypatch):
    """The server answers a :class:`MitigationError` with an OpenAI 400 (tests/test_server_api.py,
    ``test_bad_mitigation_is_an_openai_400``: the refused pairs there take this same path); any other
    exception from the resolver is a 500."""
    monkeypatch.setitem(METHODS, _Unplaced.name, _Unplaced)
    resolver = Resolver(Policy(), hf["llava"])
    for spec in (["kvsmooth", "unplaced"], ["unplaced", "kvsmooth"]):
        with pytest.raises(MitigationError) as e:
            resolver.resolve(spec)
        assert (
            e.value.reason == "unsupported"
            and "'unplaced'" in str(e.value)
            and "compose_rank" in str(e.value)
        )


def test_docs_list_every_fixture_and_preset():
    """docs/api.md names every fixture ``--fixture`` takes and every ``--mitigation-preset`` family."""

    lines = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text().splitlines()
    (fixtures,) = [
        i for i, line in enumerate(lines) if line.startswith("`halluguard-serve MODEL|--fixture NAME")
    ]
    (presets,) = [line for line in lines if line.startswith("| `--mitigation-preset FAMILY`")]
    assert all(f"`{f}`" in lines[fixtures] + lines[fixtures + 1] for f in ALL_FIXTURES)
    assert all(f"`{f}`" in presets for f in MODEL_FAMILIES)


def test_a_request_is_parsed_once_and_the_preset_family_still_applies(hf, monkeypatch):
    """The server parses a request's field once (``parse_spec``; the engine's ``resolve`` takes the
    parsed config as it is), and ``--mitigation-preset`` still picks the presets of that family."""
    import vllm_halluguard.methods as methods_pkg
    import vllm_halluguard.methods.resolve as resolve_mod
    import vllm_halluguard.server.mitigation as mitigation_mod

    plain = Resolver(Policy(), hf["llava"], vllm_config=eager())
    qwen = Resolver(Policy(preset="qwen2_vl"), hf["llava"], vllm_config=eager())
    calls: list[Any] = []
    real_parse = methods_pkg.parse

    def counting(obj):
        calls.append(obj)
        return real_parse(obj)

    monkeypatch.setattr(mitigation_mod, "parse", counting)
    monkeypatch.setattr(resolve_mod, "parse", counting)
    body = {"mitigation": [{"method": "farsight", "mode": "B"}, "kvsmooth"], "messages": []}
    composed, named = plain.for_request(body, has_image=True)
    assert named and sum(not isinstance(c, MethodConfig | type(composed)) for c in calls) == 1, calls
    assert [m.name for m in composed.members] == ["kvsmooth", "farsight"]
    assert composed.members[1].mode == "B"  # the client's mode survives the single parse
    calls.clear()
    (cfg, _), (preset_cfg, _) = (r.for_request({"mitigation": "prunehal"}, True) for r in (plain, qwen))
    assert len([c for c in calls if isinstance(c, str)]) == 2
    num_layers = hf["llava"].get_text_config().num_hidden_layers
    assert preset_cfg == METHODS["prunehal"]().for_model("qwen2_vl", num_layers) != cfg
