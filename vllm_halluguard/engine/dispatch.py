"""Run each mitigated row's method for one attention layer call (shared by every backend)."""

from __future__ import annotations

from vllm_halluguard.engine import farsight, kvsmooth, prunehal, scr
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.runtime import StepView

_APPLY = {
    "farsight": farsight.apply,
    "kvsmooth": kvsmooth.apply,
    "prunehal": prunehal.apply,
    "scr": scr.apply,
}


def run_methods(call: LayerCall, view: StepView) -> None:
    for row in view.rows:
        _APPLY[row.request.config.name](call, row)
