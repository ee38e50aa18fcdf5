"""The contract every registered method fulfils, parametrised over ``vllm_halluguard.methods.METHODS``.

A method registered there gets every test below; its entry in tests/helpers/method_cases.py (the table
every suite reads) names the configs they run.

Without an engine (``make test-fast``): the method has all its parts (config, dense reference, engine
class, request contract, server listing, unit tests, GPU-path case, docs; docs/contributing.md).
On the shared engines of both architectures: engine = reference (tokens, log-probs, free greedy run) and
the method changes the output; a no-op config = the plain request, bit for bit; a mixed batch of every
method = the solo runs; a bad config is refused for that request only.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from helpers.method_cases import COMPOSITIONS, METHOD_CASES
from helpers.parity import (
    assert_free_greedy_agrees,
    compare,
    hf_generate,
    logprob_shift,
    method_case,
    plain_answer,
    run_vllm,
)
from vllm_halluguard import reference
from vllm_halluguard.engine import registry
from vllm_halluguard.engine.base import EngineMethod
from vllm_halluguard.methods import METHODS, MODEL_FAMILIES, MethodConfig, SpecError, parse
from vllm_halluguard.methods.resolve import NOT_APPLICABLE, model_family, resolve
from vllm_halluguard.reference.base import ReferenceMethod
from vllm_halluguard.server.mitigation import Policy, Resolver
from vllm_halluguard.tiny_models import FIXTURES, SERVED_FIXTURES, ensure_fixture

ROOT = Path(__file__).resolve().parents[1]
METHOD_ATOL = 1e-3  # method parity bound (fp32); observed ~5e-6


#: Each method's configs (tests/helpers/method_cases.py, the table every suite reads).
CASES = METHOD_CASES


NAMES = sorted(METHODS)
SPEC_CASES = [(name, label) for name in NAMES if name in CASES for label in CASES[name].specs]

# ------------------------------------------------------------------------ completeness (no engine)

#: The hooks through which the base classes call a method; a method overrides at least one of each.
ENGINE_WORK = ("route", "observes", "run", "apply", "apply_batch", "kernel_args", "after_kernel", "plan_step")
REFERENCE_WORK = (
    "key_mask",
    "post_attention",
    "after_attention",
    "layer_output",
    "after_forward",
    "on_prefill",
)


@pytest.fixture(scope="module")
def hf_configs() -> dict[str, Any]:
    return {f: AutoConfig.from_pretrained(ensure_fixture(f)) for f in (*FIXTURES, *SERVED_FIXTURES)}


def test_every_method_has_cases() -> None:
    """Every registered method has an entry in tests/helpers/method_cases.py, every part filled, each
    config of its own method; labels are unique across methods (suites key their cases by label)."""
    missing = sorted(set(METHODS) - set(CASES))
    assert not missing, f"add {missing} to METHOD_CASES in tests/helpers/method_cases.py"
    assert not set(CASES) - set(METHODS), "an entry of no registered method"
    owner: dict[str, str] = {}
    for name, cases in CASES.items():
        assert cases.specs and next(iter(cases.specs.values())) == name, f"{name}: first spec = the preset"
        for part in ("noop", "bad", "served", "tensor_parallel", "members"):
            assert getattr(cases, part), f"{name}: METHOD_CASES[{name!r}].{part} is empty"
        specs = [*cases.specs.values(), *cases.noop, *(s for s, _ in cases.bad)]
        for part in (cases.served, cases.tensor_parallel, cases.members):
            specs += part.values()
            for label in part:
                assert owner.setdefault(label, name) == name, f"label {label!r} of {name} and {owner[label]}"
        assert all((s if isinstance(s, str) else s["method"]) == name for s in specs), name


def test_every_pair_of_methods_is_composed_in_the_table() -> None:
    covered = {frozenset(parse(spec).names) for spec in COMPOSITIONS.values()}
    pairs = {frozenset(p) for p in itertools.combinations(METHODS, 2)}
    missing = sorted("+".join(sorted(p)) for p in pairs - covered)  # refused settings: test_methods_compose
    assert not missing, f"COMPOSITIONS in tests/helpers/method_cases.py lacks the pairs {missing}"
    assert any(len(c) == 3 for c in covered)


@pytest.mark.parametrize("name", NAMES)
def test_config_class(name: str) -> None:
    cls = METHODS[name]
    assert issubclass(cls, MethodConfig) and cls.name == name
    assert cls.__module__ == f"vllm_halluguard.methods.{name}", "one module per method: methods/<name>.py"
    assert (inspect.getmodule(cls).__doc__ or "").strip(), "the module docstring explains the method"
    assert set(cls.preset_fields) <= set(cls.model_fields)
    for family in MODEL_FAMILIES:
        cfg = cls().for_model(family, 4)
        assert all(getattr(cfg, f) is not None for f in cls.preset_fields), (family, cfg)
        assert set(cls.provenance(family, 4)) == set(cls.preset_fields)


@pytest.mark.parametrize("name", NAMES)
def test_composition_place_and_rules(name: str, hf_configs: dict[str, Any]) -> None:
    """The class declares its place in a composition and the settings a composition refuses, and
    each refusal is what a composition holding that setting gets."""
    cls = METHODS[name]
    assert "compose_rank" in vars(cls), f"{cls.__name__} needs compose_rank (its place in a composition)"
    assert "composition_refusals" in vars(cls), (
        f"{cls.__name__} needs composition_refusals (() when every setting composes)"
    )
    ranks = {m: getattr(METHODS[m], "compose_rank", None) for m in NAMES}
    clash = [m for m in NAMES if m != name and ranks[m] == cls.compose_rank]
    assert not clash, f"{name} has the compose_rank of {clash}: ranks are unique"
    for refusal in cls.composition_refusals:
        others = [refusal.beside] if refusal.beside else [m for m in NAMES if m != name]
        for other in others:
            with pytest.raises(SpecError) as err:
                resolve([{"method": name, refusal.field: refusal.value}, other], hf_configs["llava"])
            assert err.value.reason == "unsupported" and str(err.value) == refusal.message, (other, err.value)


@pytest.mark.parametrize("name", NAMES)
def test_noop_configs_say_so(name: str, hf_configs: dict[str, Any]) -> None:
    for spec in _cases(name).noop:
        cfg = resolve(spec, hf_configs["llava"])
        assert cfg is not None and cfg.is_noop(), spec
    assert not resolve(name, hf_configs["llava"]).is_noop()


@pytest.mark.parametrize("name", NAMES)
def test_reference_class(name: str) -> None:
    assert METHODS[name] in reference.REFERENCES, (
        f"{name!r} has no dense reference: vllm_halluguard/reference/{name}.py, one ReferenceMethod subclass"
    )
    cls = reference.REFERENCES[METHODS[name]]
    assert issubclass(cls, ReferenceMethod) and cls.config_cls is METHODS[name]
    assert cls.__module__ == f"vllm_halluguard.reference.{name}"
    assert _overrides(cls, ReferenceMethod, REFERENCE_WORK), "the reference hooks into no forward"


@pytest.mark.parametrize("name", NAMES)
def test_engine_class(name: str) -> None:
    method = _engine(name)
    cls = type(method)
    assert isinstance(method, EngineMethod) and cls.name == name
    assert cls.__module__ == f"vllm_halluguard.engine.{name}"
    assert name in registry.ENGINE_METHODS
    assert _overrides(cls, EngineMethod, ENGINE_WORK), "the engine class does no work in any layer"
    for hook in vars(EngineMethod):
        mine, base = inspect.getattr_static(cls, hook), inspect.getattr_static(EngineMethod, hook)
        if callable(base) and not hook.startswith("_") and mine is not base:
            assert _params(getattr(method, hook)) == _params(getattr(EngineMethod(), hook)), (
                f"{cls.__name__}.{hook} does not take the base hook's arguments"
            )


@pytest.mark.parametrize("name", NAMES)
def test_request_contract_resolves_or_refuses_it_on_every_served_architecture(
    name: str, hf_configs: dict[str, Any]
) -> None:
    for fixture, hf_config in hf_configs.items():
        family = model_family(hf_config)
        if (name, family) in NOT_APPLICABLE:
            with pytest.raises(SpecError) as err:
                resolve(name, hf_config)
            assert err.value.reason == "unsupported", fixture
            continue
        cfg = resolve(name, hf_config)
        assert type(cfg) is METHODS[name], fixture
        assert all(getattr(cfg, f) is not None for f in METHODS[name].preset_fields), (fixture, cfg)
        with pytest.raises(SpecError):
            resolve({"method": name, "no_such_field": 1}, hf_config)


@pytest.mark.parametrize("name", NAMES)
def test_server_lists_it(name: str, hf_configs: dict[str, Any]) -> None:
    rows = {r["method"]: r for r in Resolver(Policy(), hf_configs["llava"]).describe()["data"]}
    row = rows[name]
    assert row["engine_supported"], f"the server does not serve {name!r}: {row['unsupported_reason']}"
    assert row["allowed"] and row["defaults"]["method"] == name
    assert row["schema"]["title"] == METHODS[name].__name__
    assert row["description"] and row["description"] != name
    if _engine(name).needs_image:  # the server refuses it without an image
        from vllm_halluguard.server.mitigation import IMAGE_METHODS

        assert name in IMAGE_METHODS


@pytest.mark.parametrize("name", NAMES)
def test_counters_have_metrics(name: str) -> None:
    """Every counter and gauge of the engine class is a described gauge on ``/metrics``."""
    from vllm_halluguard.server import engine_stats

    method = _engine(name)
    for key in (*method.counters, *method.gauges):
        assert key in engine_stats.DESCRIPTIONS, f"describe {key!r} in server/engine_stats.py DESCRIPTIONS"
        assert key in engine_stats.GAUGES, key
    assert set(engine_stats.DESCRIPTIONS) == set(engine_stats.engine_keys()), "a description of no counter"


@pytest.mark.parametrize("name", NAMES)
def test_unit_tests_gpu_path_case_and_docs_exist(name: str) -> None:
    from helpers.triton_mode import CASES as TRITON_CASES

    missing = [
        f"tests/test_{kind}_{name}.py"
        for kind in ("methods", "reference")
        if not (ROOT / "tests" / f"test_{kind}_{name}.py").is_file()
    ]
    singles = [spec for _, spec in TRITON_CASES if spec and not isinstance(spec, list)]  # not compositions
    if name not in {spec if isinstance(spec, str) else spec["method"] for spec in singles}:
        missing.append("a case in tests/helpers/triton_mode.py (the GPU code path's engine test)")
    headings = re.findall(r"^## (\w+)", (ROOT / "docs" / "methods.md").read_text(), re.M)
    if name not in {h.lower() for h in headings}:
        missing.append(f"a '## {name.capitalize()}' section in docs/methods.md")
    if f"| `{name}` |" not in (ROOT / "README.md").read_text():
        missing.append("a row in README.md's method table")
    assert not missing, f"{name!r} lacks: {'; '.join(missing)}"


def _cases(name: str) -> Any:
    assert name in CASES, f"add {name!r} to METHOD_CASES in tests/helpers/method_cases.py"
    return CASES[name]


def _engine(name: str) -> EngineMethod:
    assert name in registry.METHODS, (
        f"{name!r} has no engine class: an EngineMethod subclass in its engine module "
        "(docs/contributing.md, 'Adding a method')"
    )
    return registry.METHODS[name]


def _overrides(cls: type, base: type, hooks: tuple[str, ...]) -> list[str]:
    return [h for h in hooks if inspect.getattr_static(cls, h) is not inspect.getattr_static(base, h)]


def _params(fn: Any) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


# ------------------------------------------------------------------------------ on the engines


@pytest.mark.engine
@pytest.mark.parametrize(("name", "label"), SPEC_CASES)
def test_engine_matches_reference(paper_engine, hf_model, name, label):
    fixture, llm = paper_engine
    model, processor = hf_model
    spec = CASES[name].specs[label]
    case = method_case(fixture, 5, spec)
    (gen,) = run_vllm(llm, [case])
    plain = plain_answer(llm, fixture, 5)
    # the reference runs the config the engine resolved (e.g. "farsight" is served as mode C, while the
    # reference's own default is the paper's mode A)
    resolved = json.loads(resolve(spec, model.config).canonical())

    def ctx():
        return reference.apply(model, resolved)

    forced = hf_generate(model, processor, case, force=gen.token_ids, context=ctx)
    report = compare(gen, forced)
    assert report.same_tokens and report.max_abs_logprob_diff < METHOD_ATOL, report
    assert_free_greedy_agrees(forced, case)
    # the method is wired in: tokens or log-probs move away from the plain run's
    assert gen.token_ids != plain.token_ids or logprob_shift(gen, plain) > 1e-3


@pytest.mark.engine
@pytest.mark.parametrize("name", NAMES)
def test_noop_config_equals_plain(paper_engine, name):
    fixture, llm = paper_engine
    (plain,) = run_vllm(llm, [method_case(fixture, 9, None)])
    for spec in CASES[name].noop:
        (gen,) = run_vllm(llm, [method_case(fixture, 9, spec)])
        assert gen.token_ids == plain.token_ids and gen.logprobs == plain.logprobs, spec


@pytest.mark.engine
def test_mixed_batch_of_every_method_equals_solo_runs(paper_engine):
    """Every spec of every method, each preset twice (rows of one config are batched together), and
    plain rows, in one batch."""
    fixture, llm = paper_engine
    specs: list[Any] = [None]
    for name in NAMES:
        specs += [*CASES[name].specs.values(), name]
    specs.append(None)
    prompts = ["Describe the image.", "What is in the picture?", "Is there a cat?"]
    cases = [method_case(fixture, 20 + i, s, prompts[i % len(prompts)]) for i, s in enumerate(specs)]
    batch = run_vllm(llm, cases)
    for case, gen in zip(cases, batch, strict=True):
        (solo,) = run_vllm(llm, [case])
        report = compare(gen, solo)
        assert report.same_tokens and report.max_abs_logprob_diff < 1e-5, f"{case.extra_args}: {report}"
    stats = _worker_stats(llm, fixture)
    assert stats["active"] == 0 and stats["admitted"] == stats["released"], stats


@pytest.mark.engine
@pytest.mark.parametrize("name", [*NAMES, None])
def test_bad_config_is_refused_for_that_request_only(paper_engine, name):
    from vllm.exceptions import VLLMValidationError

    fixture, llm = paper_engine
    bad = CASES[name].bad if name else [("bogus", "unknown method 'bogus'")]
    for spec, needle in bad:
        with pytest.raises(VLLMValidationError, match="halluguard") as err:
            run_vllm(llm, [method_case(fixture, 1, spec)])
        assert needle in str(err.value), (spec, str(err.value))
    (ok,) = run_vllm(llm, [method_case(fixture, 1, name or "kvsmooth")])  # the engine keeps serving
    assert len(ok.token_ids) == 32


def _worker_stats(llm, fixture):
    """Runtime counters, after one plain step delivers the last finished request ids to the worker."""
    from helpers.parity import Case
    from vllm_halluguard.engine.runtime import worker_stats

    run_vllm(llm, [Case(fixture, None, max_tokens=1)])
    (stats,) = llm.collective_rpc(worker_stats)
    return stats
