"""Run each mitigated row's method for one attention layer call (shared by every backend).

Where the backend can gather several rows at once (``LayerCall.gather_batch``), the single-token rows
of FarSight, KVSmooth and PruneHal go to that method's ``apply_batch`` together (one padded gather and
one batched attention per method); every other row (prefill, chunks, SCR) goes to ``apply`` one by one.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_halluguard.engine import farsight, kvsmooth, prunehal, scr
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.runtime import Row, StepView

_APPLY: dict[str, Callable[[LayerCall, Row], None]] = {
    "farsight": farsight.apply,
    "kvsmooth": kvsmooth.apply,
    "prunehal": prunehal.apply,
    "scr": scr.apply,
}
_APPLY_BATCH: dict[str, Callable[[LayerCall, list[Row]], None]] = {
    "farsight": farsight.apply_batch,
    "kvsmooth": kvsmooth.apply_batch,
    "prunehal": prunehal.apply_batch,
}


def run_methods(call: LayerCall, view: StepView) -> None:
    """Apply every mitigated row's method; batch the single-token rows per method where possible."""
    batches: dict[str, list[Row]] = {}
    batched = call.gather_batch is not None
    for row in view.rows:
        name = row.request.config.name
        if batched and name in _APPLY_BATCH and call.is_single(row):
            batches.setdefault(name, []).append(row)
        else:
            _APPLY[name](call, row)
    for name, rows in batches.items():
        _APPLY_BATCH[name](call, rows)
