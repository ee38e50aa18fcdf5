"""Every test that starts an engine or a server carries the marker that lets ``-m`` select it.

A test needs ``engine`` when it uses the shared in-process ``engines`` pool or calls ``make_llm`` /
``engine`` (the parity harness) itself or through a fixture; it needs ``server`` when it, or one of
its fixtures, calls ``running_server`` or uses the ``shared_servers`` fixture. Checked at collection
(``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Marker -> (fixtures that start one, names whose call in a test or fixture body starts one).
STARTERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "engine": (frozenset({"engines"}), frozenset({"make_llm", "engine"})),
    "server": (frozenset({"shared_servers"}), frozenset({"running_server"})),
}


def _called_names(func: Any) -> set[str]:
    """Global names a function's code refers to (its nested code objects included)."""
    names: set[str] = set()
    todo = [getattr(func, "__code__", None)]
    while todo:
        code = todo.pop()
        if code is None:
            continue
        names |= set(code.co_names)
        todo += [c for c in code.co_consts if hasattr(c, "co_names")]
    return names


def needed_markers(item: Any) -> set[str]:
    """The markers ``item`` (a pytest Function) must carry, from its fixtures and code."""
    funcs = [item.function] + [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    called = set().union(*(_called_names(f) for f in funcs))
    return {
        marker
        for marker, (fixtures, calls) in STARTERS.items()
        if fixtures & set(item.fixturenames) or calls & called
    }


def unmarked(items: Iterable[Any]) -> list[str]:
    """``"nodeid: needs engine, server"`` for each item lacking a marker it needs."""
    problems = []
    for item in items:
        if not hasattr(item, "function"):
            continue
        missing = sorted(m for m in needed_markers(item) if item.get_closest_marker(m) is None)
        if missing:
            problems.append(f"{item.nodeid}: needs {', '.join(missing)}")
    return problems
