"""What the method contract says about a new method: a dummy fifth method, registered here only (never
shipped), with a complete config class and nothing else.

Every engine-free contract test (tests/test_engine_contract.py) runs for it as for a registered
method; those that need a part it lacks fail with a message naming the part (a file, a table entry,
a class attribute), and those it fulfils pass. docs/contributing.md counts the files from this list.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Self

import pytest
from pydantic import Field
from transformers import AutoConfig

import test_engine_contract as contract
from vllm_halluguard.methods import METHODS, MethodConfig, ModelFamily, order
from vllm_halluguard.methods.base import LayerSpec, Refusal
from vllm_halluguard.tiny_models import FIXTURES, SERVED_FIXTURES, ensure_fixture


class DummyConfig(MethodConfig):
    """A method that would scale nothing (a test-only config; no reference, engine, tests or docs)."""

    name: ClassVar[str] = "dummy"
    compose_rank: ClassVar[int] = 50
    composition_refusals: ClassVar[tuple[Refusal, ...]] = ()
    layer_fields: ClassVar[tuple[str, ...]] = ("layers",)
    preset_fields: ClassVar[tuple[str, ...]] = ("layers",)

    scale: float = Field(default=0.5, ge=0.0)
    layers: LayerSpec | None = None

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        del model_family
        return cls(layers=tuple(range(num_layers)))

    def is_noop(self) -> bool:
        return self.scale == 0.0 or self.layers == ()


#: Contract test -> what its failure must name for the dummy (``None``: it passes).
EXPECTED: dict[str, str | None] = {
    "test_every_method_has_cases": "add ['dummy'] to METHOD_CASES in tests/helpers/method_cases.py",
    "test_every_pair_of_methods_is_composed_in_the_table": "COMPOSITIONS in tests/helpers/method_cases.py "
    "lacks the pairs ['dummy+farsight', 'dummy+kvsmooth', 'dummy+prunehal', 'dummy+scr']",
    "test_config_class": "one module per method: methods/<name>.py",
    "test_composition_place_and_rules": None,
    "test_noop_configs_say_so": "add 'dummy' to METHOD_CASES",
    "test_reference_class": "vllm_halluguard/reference/dummy.py",
    "test_engine_class": "'dummy' has no engine class",
    "test_request_contract_resolves_or_refuses_it_on_every_served_architecture": None,
    "test_server_lists_it": "the server does not serve 'dummy': the engine has no implementation of it",
    "test_counters_have_metrics": "'dummy' has no engine class",
    "test_unit_tests_gpu_path_case_and_docs_exist": "'dummy' lacks: tests/test_methods_dummy.py; "
    "tests/test_reference_dummy.py; a case in tests/helpers/triton_mode.py (the GPU code path's engine "
    "test); a '## Dummy' section in docs/methods.md; a row in README.md's method table",
}


def _engine_free_tests() -> dict[str, Any]:
    return {
        name: fn
        for name, fn in vars(contract).items()
        if name.startswith("test_")
        and callable(fn)
        and "engine" not in {m.name for m in getattr(fn, "pytestmark", [])}
    }


@pytest.fixture(scope="module")
def hf_configs() -> dict[str, Any]:
    return {f: AutoConfig.from_pretrained(ensure_fixture(f)) for f in (*FIXTURES, *SERVED_FIXTURES)}


def _run(fn: Any, method: str, hf_configs: dict[str, Any]) -> str | None:
    """The failure message of a contract test run for ``method``, ``None`` if it passes."""
    args = {"name": method, "hf_configs": hf_configs}
    try:
        fn(**{p: args[p] for p in inspect.signature(fn).parameters})
    except (AssertionError, KeyError) as e:
        return str(e) or type(e).__name__
    return None


def test_the_contract_names_what_a_new_method_lacks(
    monkeypatch: pytest.MonkeyPatch, hf_configs: dict[str, Any]
) -> None:
    assert set(_engine_free_tests()) == set(EXPECTED), "a contract test without an expectation here"
    monkeypatch.setitem(METHODS, DummyConfig.name, DummyConfig)
    assert order()[-1] == "dummy"  # its rank places it last in a composition
    for name, fn in _engine_free_tests().items():
        needle = EXPECTED[name]
        message = _run(fn, "dummy", hf_configs)
        if needle is None:
            assert message is None, f"{name} failed for a dummy that fulfils it: {message}"
        else:
            assert message is not None and needle in message, f"{name}: {message!r} does not name {needle!r}"


def test_the_contract_passes_for_a_registered_method(hf_configs: dict[str, Any]) -> None:
    """The same calls pass for a shipped method (the failures above are the dummy's)."""
    for name, fn in _engine_free_tests().items():
        assert _run(fn, "farsight", hf_configs) is None, name
