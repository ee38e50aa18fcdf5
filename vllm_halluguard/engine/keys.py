"""How a request carries its method: the ``extra_args`` keys and the per-request memo of its config.

A request selects a method with ``SamplingParams(extra_args={"halluguard": spec})``. Admission
(:mod:`vllm_halluguard.engine.hooks`) resolves the spec once and writes the canonical config back
under the same key, so every later reader (scheduler, workers) parses a resolved config, once per
process and request (:func:`config_of`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vllm_halluguard.methods import Config, parse

EXTRA_ARGS_KEY = "halluguard"
#: On SCR's hidden diagnostic copy of a request (engine/two_pass.py): the id of the real request.
#: Internal: admission refuses requests that carry it (or any other ``halluguard*`` key).
SCR_PARENT_KEY = "halluguard_scr_parent"

_MEMO = "_halluguard_config"


def spec_of(extra_args: Mapping[str, Any] | None) -> Any:
    """The request's method spec (``None`` if absent).

    A string that starts with ``{`` or ``[`` is decoded as JSON: the OpenAI server's ``vllm_xargs`` only
    carries flat values, so the server sends an object spec (or a composition's list) as its JSON text.
    Text that is not valid JSON is returned as is, and parsing rejects it as an unknown method.
    """
    spec = None if not extra_args else extra_args.get(EXTRA_ARGS_KEY)
    if isinstance(spec, str) and spec.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(spec)
        except json.JSONDecodeError:
            return spec
    return spec


def config_of(holder: Any) -> Config | None:
    """The config of an admitted request (an engine-core ``Request`` or a runner's cached request),
    parsed once and memoised on it; ``None`` for plain requests and specs that do not parse (a request
    rejected at admission is never scheduled)."""
    memo = holder.__dict__.get(_MEMO, False)
    if memo is not False:
        return memo
    params = getattr(holder, "sampling_params", None)
    try:
        cfg = parse(spec_of(getattr(params, "extra_args", None)))
    except ValueError:
        cfg = None
    holder.__dict__[_MEMO] = cfg
    return cfg
