"""Training-free hallucination mitigation for VLMs inside vLLM."""

#: The package version: the one place it is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

from pathlib import Path as _Path

# The server and the load generator live in the repository's top-level folders `server/` and
# `loadtest/`; an install maps them to `vllm_halluguard.server` / `.loadtest` (pyproject.toml's
# package-dir). When this package is imported straight from a source checkout (its root on
# sys.path, with another checkout installed or none), the checkout's root is searched as well, so
# both subpackages come from the same tree as this one.
_root = _Path(__file__).resolve().parent.parent
if all((_root / p).is_file() for p in ("pyproject.toml", "server/__init__.py", "loadtest/__init__.py")):
    __path__.append(str(_root))
