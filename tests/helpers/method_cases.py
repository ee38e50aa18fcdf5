"""One table of test cases per method: every suite that runs "each method" reads its configs here.

A registered method (``vllm_halluguard.methods.METHODS``) without an entry fails
``tests/test_engine_contract.py::test_every_method_has_cases`` (which names the missing part); each
suite takes its own field, so adding an entry puts the method in all of them:

* ``specs``, ``noop``, ``bad``: the method contract (tests/test_engine_contract.py);
* ``served``: the engine-mode suites: the served VLMs (tests/test_served_vlms.py) and compiled models
  (tests/test_engine_compiled.py, without the ``eager_only`` methods);
* ``tensor_parallel``: tests/test_engine_tp.py;
* ``members``: the member configs that :data:`COMPOSITIONS` combines (tests/test_engine_compose.py);
* ``needs_image``: the server's refusal of the method without an image (tests/test_server_fuzz.py).

Labels are unique across methods (a suite keys its cases by label). Entries are in the order the
engine-mode suites batch them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The settings of PruneHal, FarSight and SCR that act on a 4-layer tiny model within a dozen steps.
PRUNE = {"method": "prunehal", "r": 0.5}  # prunes at step 2 (the preset's forced prune)
FS_B = {"method": "farsight", "mode": "B"}
FS_C = {"method": "farsight", "mode": "C"}
SCR_STRONG = {"method": "scr", "top_k": 6, "lam": 1.6, "diag_layers": [1, 2, 3], "layers": [0, 1, 2]}
PRUNE_VOTE = {"method": "prunehal", "r": 0.6, "t": 3, "force_step": None, "statistic": "mass"}


@dataclass(frozen=True)
class MethodCases:
    """What the suites run for one method (specs as users write them)."""

    #: label -> a config checked against the dense reference; the first is the method's preset.
    specs: dict[str, Any]
    #: Configs that make the method the identity (``MethodConfig.is_noop``).
    noop: list[Any]
    #: Configs refused at admission, with a word the error names.
    bad: list[tuple[Any, str]]
    #: label -> configs the engine-mode suites (served VLMs, compiled) check against the reference.
    served: dict[str, Any]
    #: label -> configs the tensor-parallel suite checks against the reference.
    tensor_parallel: dict[str, Any]
    #: label -> member configs the composition suite combines.
    members: dict[str, Any]
    #: The method acts on image tokens only: the server refuses it on a request without an image.
    needs_image: bool
    #: The method needs ``--enforce-eager`` (refused on a compiled model).
    eager_only: bool = False


METHOD_CASES: dict[str, MethodCases] = {
    "kvsmooth": MethodCases(
        specs={"preset": "kvsmooth"},
        noop=[{"method": "kvsmooth", "layers": []}],
        bad=[
            ({"method": "kvsmooth", "window": 0}, "window"),
            ({"method": "kvsmooth", "lam_ref": "high"}, "lam_ref"),
            ({"method": "kvsmooth", "layers": [99]}, "do not exist"),
        ],
        served={"kvsmooth": "kvsmooth"},
        tensor_parallel={
            "kvsmooth": "kvsmooth",
            "kvsmooth_entropy_of_mean": {
                "method": "kvsmooth",
                "head_reduce": "entropy_of_mean",
                "lam_ref": 0.5,
            },
        },
        members={"kvsmooth": "kvsmooth"},
        needs_image=False,
    ),
    "farsight": MethodCases(
        specs={
            "preset": "farsight",  # mode C, the served default
            "b": FS_B,
            "b_sparse": {"method": "farsight", "mode": "B", "sigma": 0.5, "layers": [1, 2]},
        },
        noop=[{"method": "farsight", "layers": []}],
        bad=[({"method": "farsight", "mode": "A"}, "mode 'A'")],
        served={"farsight_b": FS_B, "farsight_c": FS_C},
        tensor_parallel={"farsight_b": FS_B, "farsight_c": FS_C},
        members={"farsight_b": FS_B, "farsight_c": FS_C},
        needs_image=False,
    ),
    "prunehal": MethodCases(
        specs={
            "preset": "prunehal",
            "subset_first_step": {
                "method": "prunehal",
                "r": 0.5,
                "t": 5,
                "history": "first_step",
                "layers": [1, 2],
            },
            "vote_only": PRUNE_VOTE,
        },
        noop=[{"method": "prunehal", "r": 1.0}],
        bad=[({"method": "prunehal", "r": 1.5}, "r: Input should be less than or equal to 1")],
        served={"prunehal": {**PRUNE, "t": 3}},
        tensor_parallel={"prunehal": "prunehal", "prunehal_vote": PRUNE_VOTE},
        members={"prunehal": PRUNE},
        needs_image=True,
    ),
    "scr": MethodCases(
        specs={
            "preset": "scr",
            "strong": SCR_STRONG,
            "last_row_4conn": {
                "method": "scr",
                "top_k": 3,
                "lam": 2.0,
                "connectivity": 4,
                "diag_rows": "last",
            },
        },
        noop=[{"method": "scr", "top_k": 0}, {"method": "scr", "lam": 1.0}, {"method": "scr", "layers": []}],
        bad=[({"method": "scr", "top_k": -1}, "top_k")],
        served={"scr": SCR_STRONG},
        tensor_parallel={"scr": SCR_STRONG},
        members={"scr": {"method": "scr", "top_k": 6, "lam": 1.6}},
        needs_image=True,
        eager_only=True,
    ),
}


def labelled(part: str, *, eager: bool = True) -> dict[str, Any]:
    """Every method's ``part`` (``served``, ``tensor_parallel``, ``members``) in one ``label -> spec``
    dict, in table order; ``eager=False`` leaves out the ``eager_only`` methods."""
    out: dict[str, Any] = {}
    for cases in METHOD_CASES.values():
        if eager or not cases.eager_only:
            out.update(getattr(cases, part))
    return out


def eager_only() -> set[str]:
    """The methods that need ``--enforce-eager``."""
    return {name for name, cases in METHOD_CASES.items() if cases.eager_only}


def image_methods() -> set[str]:
    """The methods the server refuses on a request without an image."""
    return {name for name, cases in METHOD_CASES.items() if cases.needs_image}


def _members(*labels: str) -> list[Any]:
    table = labelled("members")
    return [table[label] for label in labels]


#: label -> a composition the composition suite checks against the composed reference: every pair of
#: the methods (FarSight in both served modes where the pair's terms meet in one attention call),
#: written in various orders, and one triple. A new method adds its pairs here.
COMPOSITIONS: dict[str, list[Any]] = {
    "farsight_c+kvsmooth": _members("farsight_c", "kvsmooth"),
    "farsight_b+kvsmooth": _members("kvsmooth", "farsight_b"),
    "farsight_b+prunehal": _members("farsight_b", "prunehal"),
    "farsight_c+prunehal": _members("prunehal", "farsight_c"),
    "kvsmooth+prunehal": _members("kvsmooth", "prunehal"),
    "scr+kvsmooth": _members("kvsmooth", "scr"),
    "scr+farsight_c": _members("scr", "farsight_c"),
    "scr+prunehal": _members("prunehal", "scr"),
    "triple": _members("farsight_b", "kvsmooth", "prunehal"),
}
