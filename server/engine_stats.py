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

#: ``worker_stats`` key -> gauge. The totals count since the engine started.
GAUGES = {
    "admitted": Gauge(
        "halluguard_engine_admitted_requests",
        "Mitigated requests the engine's workers admitted (total since start; a preempted one again)",
        multiprocess_mode="mostrecent",
    ),
    "prunehal_freed_blocks": Gauge(
        "halluguard_prunehal_freed_blocks",
        "KV blocks PruneHal's reclaiming variant gave back to vLLM's block pool (total since start)",
        multiprocess_mode="mostrecent",
    ),
    "prunehal_reclaiming_requests": Gauge(
        "halluguard_prunehal_reclaiming_requests",
        "Requests that gave back at least one KV block (total since start)",
        multiprocess_mode="mostrecent",
    ),
    "prunehal_reclaimable_blocks": Gauge(
        "halluguard_prunehal_reclaimable_blocks",
        "Prompt KV blocks of running PruneHal requests that no layer reads any more",
        multiprocess_mode="mostrecent",
    ),
}
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
