"""Compositions in the request contract: which pairs compose, their order, canonical form and
refusals (no engine; the engine = reference checks are in tests/test_engine_compose.py)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from vllm_halluguard.engine.keys import spec_of
from vllm_halluguard.methods import METHODS, Composition, SpecError, parse
from vllm_halluguard.methods.resolve import resolve


def _hf(model_type: str = "llava", layers: int = 4) -> SimpleNamespace:
    text = SimpleNamespace(num_hidden_layers=layers)
    return SimpleNamespace(model_type=model_type, get_text_config=lambda: text)


def _single(name: str) -> dict:
    return {"method": name, "mode": "C"} if name == "farsight" else {"method": name}


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(METHODS, 2)))
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_pair_resolves_to_its_members_resolved_alone(a, b, family):
    composed = resolve([a, b], _hf(family))
    assert isinstance(composed, Composition)
    assert {m.name for m in composed.members} == {a, b}
    for member in composed.members:
        assert member == resolve(_single(member.name), _hf(family))
    # written the other way round: the same config, the same canonical text (one cache salt)
    other = resolve([b, a], _hf(family))
    assert other == composed and other.canonical() == composed.canonical()
    # the canonical text is what the engine receives in extra_args, and it parses back
    assert parse(spec_of({"halluguard": composed.canonical()})) == composed
    assert composed.name == "+".join(m["method"] for m in json.loads(composed.canonical()))


def test_the_triple_and_the_quadruple_compose():
    triple = resolve(["farsight", "prunehal", "kvsmooth"], _hf())
    assert triple.name == "prunehal+kvsmooth+farsight"
    assert len(resolve(list(METHODS), _hf()).members) == len(METHODS)


@pytest.mark.parametrize(
    ("spec", "reason", "needle"),
    [
        *[
            ([{"method": "farsight", "mode": "A"}, other], "unsupported", "composes with no other method")
            for other in METHODS
            if other != "farsight"
        ],
        ([{"method": "kvsmooth", "head_reduce": "entropy_of_mean"}, "prunehal"], "unsupported", "prunehal"),
        (["kvsmooth", {"method": "prunehal", "selection": "shared"}], "unsupported", "served alone"),
        (["kvsmooth", "KVSmooth"], "invalid_spec", "appears twice"),
        (["none", "farsight"], "invalid_spec", "'none' cannot be composed"),
        ([["kvsmooth"], "farsight"], "invalid_spec", "names or objects"),
        (["kvsmooth", "bogus"], "unknown_method", "bogus"),
        (["kvsmooth", {"method": "farsight", "layers": [9]}], "invalid_params", "do not exist"),
        (["kvsmooth", *METHODS], "invalid_spec", "at most"),
    ],
)
def test_refused_compositions_say_why(spec, reason, needle):
    with pytest.raises(SpecError) as err:
        resolve(spec, _hf())
    assert err.value.reason == reason and needle in str(err.value), err.value


def test_kvsmooth_entropy_of_mean_composes_without_prunehal():
    cfg = resolve([{"method": "kvsmooth", "head_reduce": "entropy_of_mean"}, "farsight"], _hf())
    assert cfg.member("kvsmooth").head_reduce == "entropy_of_mean"


def test_a_member_that_does_not_apply_to_the_architecture_refuses_the_composition():
    with pytest.raises(SpecError) as err:
        resolve(["kvsmooth", "scr"], _hf("llava_next", 32))
    assert err.value.reason == "unsupported" and "scr" in str(err.value)
    assert isinstance(resolve(["kvsmooth", "prunehal"], _hf("llava_next", 32)), Composition)


def test_short_lists_are_single_methods():
    assert resolve([], _hf()) is None
    assert resolve(["kvsmooth"], _hf()) == resolve("kvsmooth", _hf())


def test_the_eval_runner_sends_and_reports_compositions():
    from vllm_halluguard.eval.records import parse_mitigation
    from vllm_halluguard.eval.report import _applied_method

    m = parse_mitigation('["farsight", {"method": "kvsmooth", "window": 4}]')
    assert m.spec == ["farsight", {"method": "kvsmooth", "window": 4}]
    assert m.label == "farsight+kvsmooth(window=4)"
    assert parse_mitigation('fk=["farsight", "kvsmooth"]').label == "fk"
    with pytest.raises(ValueError, match="list of names"):
        parse_mitigation("[1, 2]")
    header = resolve(["farsight", "kvsmooth"], _hf()).canonical()  # what the server echoes
    assert _applied_method(header) == "kvsmooth+farsight"
