"""Engine-side halluguard counters on ``/metrics``, read from the workers when ``/metrics`` is scraped.

The counters live in the engine's worker processes (:func:`vllm_halluguard.engine.runtime.worker_stats`);
the API process asks the first worker for them (``collective_rpc`` by name) just before vLLM renders
``/metrics``, and mirrors them in gauges of prometheus_client's default registry. With tensor
parallelism every rank takes the same decisions, so rank 0 speaks for all. With several API processes
(Prometheus multiprocess mode) the value of the latest scrape wins (``mostrecent``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Gauge

logger = logging.getLogger(__name__)

#: What each engine counter on ``/metrics`` means, by ``worker_stats`` key: the runtime's ``admitted``
#: and every engine method's ``counters`` and ``gauges`` (``EngineMethod``). A method's new counter
#: needs its line here (``tests/test_engine_contract.py::test_counters_have_metrics``).
DESCRIPTIONS: dict[str, str] = {
    "admitted": "Mitigated requests the engine's workers admitted (total since start; a preempted one again)",
    "farsight_native_rows": "Rows of FarSight requests that vLLM's own kernel served with a sink, summed "
    "over steps (total since start)",
    "prunehal_freed_blocks": "KV blocks PruneHal's reclaiming variant gave back to vLLM's block pool "
    "(total since start)",
    "prunehal_reclaiming_requests": "Requests that gave back at least one KV block (total since start)",
    "prunehal_reclaimable_blocks": "Prompt KV blocks of running PruneHal requests that no layer reads "
    "any more",
    "scr_edits": "SCR edits applied: prefill steps that held a request's whole image (total since start)",
    "scr_split_images": "SCR prefill steps that found a request's image split across chunks, not edited "
    "(the request fails; total since start)",
    "scr_unedited": "SCR requests that ran unedited for want of a diagnostic result (total since start)",
    "scr_early_exits": "Steps holding SCR diagnostic passes only, stopped after their last diagnostic "
    "layer (total since start)",
}
#: Metric names that are not ``halluguard_<key>``.
NAMES = {"admitted": "halluguard_engine_admitted_requests"}


def engine_keys() -> tuple[str, ...]:
    """The ``worker_stats`` keys shown on ``/metrics``: ``admitted``, then each registered engine
    method's counters and gauges."""
    from vllm_halluguard.engine import registry

    keys = ["admitted"]
    for method in registry.all_methods():
        keys += [*method.counters, *method.gauges]
    return tuple(dict.fromkeys(keys))


def _gauge(key: str) -> Gauge:
    return Gauge(
        NAMES.get(key, f"halluguard_{key}"),
        DESCRIPTIONS.get(key, key),  # a key without a line fails the test named above, not the server
        multiprocess_mode="mostrecent",
    )


#: ``worker_stats`` key -> gauge, one per :func:`engine_keys`.
GAUGES: dict[str, Gauge] = {key: _gauge(key) for key in engine_keys()}
#: Longest wait for the workers' answer before ``/metrics`` is served with the previous values.
TIMEOUT_S = 5.0


async def refresh(app: Any) -> None:
    """Update the gauges from the engine behind ``app`` (vLLM's ``app.state.engine_client``)."""
    from vllm_halluguard.engine.runtime import RPC_NAME

    client = getattr(getattr(app, "state", None), "engine_client", None)
    if client is None:
        return
    try:
        results = await asyncio.wait_for(client.collective_rpc(RPC_NAME), TIMEOUT_S)
    except Exception as e:  # a busy or stopping engine must not break /metrics
        logger.debug("halluguard: worker stats unavailable: %s", e)
        return
    if not results:
        return
    for key, gauge in GAUGES.items():
        gauge.set(float(results[0].get(key, 0)))
