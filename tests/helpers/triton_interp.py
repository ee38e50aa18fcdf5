"""A cheaper device-function call in Triton's interpreter (``TRITON_INTERPRET=1``; test-only).

Triton 3.7's interpreter patches ``triton.language`` for a launch (``GridExecutor.__call__`` calls
``_patch_lang(kernel)``, which walks ``tl``, ``tl.core``, ``tl.tensor`` and ``tl.math`` with
``inspect.getmembers`` and wraps every builtin), and then again at **every device-function call**
inside it (``InterpretedFunction.__call__``: ``tl.sum``, ``tl.max``, ``tl.cdiv``, a kernel's own
``@triton.jit`` helpers), once per program instance. Within a launch those repeated walks change
nothing: the builtins are already wrapped (a wrapper is no builtin, so it is not wrapped again) and
the few plain attributes (``range``, ``static_assert``, ``tensor.__bool__`` ...) are set to
equivalent values; their scopes are never restored by the interpreter either.

:func:`install` skips a device function's ``_patch_lang`` when every ``triton.language`` module in
its globals is already patched by the enclosing launch, and calls the original otherwise (the
first call that brings ``tl.core`` into a launch that only patched ``tl``, and every launch itself).
Kernels, their arguments and the interpreter's execution are unchanged; ``tests/test_triton_interp.py``
checks outputs and the patched state against the original path. vLLM's V2 sampling and
input-preparation kernels spend about a third of their interpreted time in these walks.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

_STATE: dict[str, Any] = {}
_LOCAL = threading.local()  # per thread: a stack, one entry per active launch (patched module ids)


def _lang_ids(fn: Any) -> frozenset[int]:
    import triton.language as tl

    langs = (tl, tl.core)
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in langs)


def installed() -> bool:
    return bool(_STATE)


def install() -> None:
    """Use the cheaper device-function call (idempotent; needs ``TRITON_INTERPRET=1`` already set)."""
    if _STATE:
        return
    from triton.runtime import interpreter

    for name in ("_patch_lang", "_LangPatchScope", "GridExecutor"):
        if not hasattr(interpreter, name):  # another Triton: fail loudly rather than run unpatched
            raise RuntimeError(f"triton.runtime.interpreter.{name} is gone; update helpers.triton_interp")
    patch_lang = interpreter._patch_lang
    launch = interpreter.GridExecutor.__call__

    def stack() -> list[frozenset[int] | None]:
        if not hasattr(_LOCAL, "stack"):
            _LOCAL.stack = []
        return _LOCAL.stack

    def cheap_patch_lang(fn: Any) -> Any:
        launches = stack()
        ids = _lang_ids(fn)
        if launches and launches[-1] is not None and ids <= launches[-1]:
            return interpreter._LangPatchScope()  # already patched by this launch: nothing to do
        scope = patch_lang(fn)
        if launches:
            launches[-1] = ids if launches[-1] is None else launches[-1] | ids
        return scope

    def counted_launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        launches = stack()
        launches.append(None)  # the launch's own _patch_lang comes first and always runs
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    _STATE.update(patch_lang=patch_lang, launch=launch)
    interpreter._patch_lang = cheap_patch_lang
    interpreter.GridExecutor.__call__ = counted_launch  # type: ignore[method-assign]


def uninstall() -> None:
    """Back to Triton's own device-function call."""
    if not _STATE:
        return
    from triton.runtime import interpreter

    interpreter._patch_lang = _STATE["patch_lang"]
    interpreter.GridExecutor.__call__ = _STATE["launch"]  # type: ignore[method-assign]
    _STATE.clear()
