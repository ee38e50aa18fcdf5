"""Host time of the worker's per-step sync with the scheduler's decisions (no model, no forward).

    python benchmarks/host_step.py          # 64, 256 and 1024 rows; plain only and with 4 mitigated rows

Times one decode step (nothing arrives, nothing finishes) of

* V1: ``Runtime.update``, which V1's ``_update_states`` hook calls (:func:`~vllm_halluguard.engine.
  runtime.sync_step`);
* V2: :func:`~vllm_halluguard.engine.runner_v2.follow_step`, which the ``gather_batch_req_state`` hook
  calls after vLLM ordered the rows (vLLM's own gather is not timed); its batch is vLLM's real
  ``BatchReqState``.

``old`` is the per-row code before issue 27, kept here for comparison only (:class:`OldRuntime`,
:func:`old_follow_step`): V1 looked up every row in the runner's request table, V2 also kept a
``V2Request`` per plain request and refreshed it every step. ``new`` is the package's code. Prints the
median over 7 repeats of microseconds per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from vllm_halluguard.engine import registry
from vllm_halluguard.engine.runner_v2 import V2Request, follow_step, records
from vllm_halluguard.engine.runtime import Runtime, sync_step
from vllm_halluguard.engine.state import Row, StepView
from vllm_halluguard.methods import FarSightConfig, KVSmoothConfig

ROWS = (64, 256, 1024)
MITIGATED = (FarSightConfig(mode="C", layers=(0, 1)), KVSmoothConfig(lam_ref=0.5, layers=(1,))) * 2
PROMPT = 10


class OldRuntime(Runtime):
    """``Runtime.update`` before issue 27: every row of the batch looked up (for comparison only)."""

    def update(self, scheduler_output: Any, input_batch: Any, requests: dict[str, Any]) -> None:
        self.retire(scheduler_output)
        rows = []
        for index, req_id in enumerate(input_batch.req_ids[: input_batch.num_reqs]):
            state = self.requests.get(req_id)
            if state is None and req_id in requests:
                state = self._admit(req_id, requests[req_id])
            if state is not None:
                rows.append(Row(index, state))
        needs = self._needs_attention(rows, scheduler_output, requests)
        self.step = StepView(input_batch.num_reqs, tuple(rows), needs) if rows else None
        by_method: dict[str, list[Row]] = {}
        for row in rows:
            for method, member_row in registry.member_rows(row):
                by_method.setdefault(method.name, []).append(member_row)
        for method in registry.all_methods():
            method.plan_step(self, by_method.get(method.name, []), scheduler_output, input_batch, requests)


def old_follow_step(runner: Any, scheduler_output: Any, batch: Any) -> None:
    """The V2 ``gather_batch_req_state`` hook's body before issue 27 (for comparison only)."""
    table = records(runner)
    computed = runner.req_states.num_computed_tokens_np
    for req_id, index in zip(batch.req_ids, batch.idx_mapping_np, strict=True):
        record = table.get(req_id)
        if record is not None:
            record.num_computed_tokens = int(computed[index])
    rows = SimpleNamespace(req_ids=list(batch.req_ids), num_reqs=len(batch.req_ids))
    sync_step(runner, scheduler_output, rows, table)


def _vllm_config() -> SimpleNamespace:
    text = SimpleNamespace(num_hidden_layers=4, num_attention_heads=4)
    hf = SimpleNamespace(model_type="llava", image_token_id=None, get_text_config=lambda: text)
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf),
        scheduler_config=SimpleNamespace(max_num_seqs=max(ROWS)),
        cache_config=SimpleNamespace(block_size=16),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


def _request(req_id: str, cfg: Any) -> SimpleNamespace:
    """A new request's data (``NewRequestData``) or a V1 runner record: the fields the runtime reads."""
    extra = None if cfg is None else {"halluguard": cfg.canonical()}
    return SimpleNamespace(
        req_id=req_id,
        sampling_params=SimpleNamespace(extra_args=extra),
        prompt_token_ids=[1] * PROMPT,
        mm_features=None,
        num_computed_tokens=PROMPT,
    )


def _output(ids: list[str], new: list[Any]) -> SimpleNamespace:
    return SimpleNamespace(
        finished_req_ids=set(),
        preempted_req_ids=set(),
        num_scheduled_tokens=dict.fromkeys(ids, 1),
        total_num_scheduled_tokens=len(ids),
        scheduled_new_reqs=new,
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()),
        scheduled_spec_decode_tokens={},
    )


def _batch(n: int, mitigated: int) -> tuple[list[str], dict[str, Any]]:
    """Row ids (the mitigated rows spread over the batch) and each request's data."""
    ids = [f"req{i}" for i in range(n)]
    cfgs: dict[str, Any] = dict.fromkeys(ids)
    for k in range(mitigated):
        cfgs[ids[(k * n) // mitigated + n // (2 * mitigated)]] = MITIGATED[k]
    return ids, {r: _request(r, cfg) for r, cfg in cfgs.items()}


def v1_step(n: int, mitigated: int, runtime_cls: type[Runtime]) -> Callable[[], None]:
    ids, requests = _batch(n, mitigated)
    batch = SimpleNamespace(req_ids=ids, num_reqs=n, req_id_to_index={r: i for i, r in enumerate(ids)})
    runtime = runtime_cls(_vllm_config())
    runtime.update(_output(ids, list(requests.values())), batch, requests)  # every request arrives
    assert len(runtime.requests) == mitigated
    output = _output(ids, [])
    return lambda: runtime.update(output, batch, requests)


def v2_step(n: int, mitigated: int, old: bool) -> Callable[[], None]:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    ids, requests = _batch(n, mitigated)
    slots = {r: i for i, r in enumerate(reversed(ids))}
    prompt = np.full(n, PROMPT, dtype=np.int32)
    runner = SimpleNamespace(
        req_states=SimpleNamespace(
            req_id_to_index=slots,
            prefill_len=SimpleNamespace(np=prompt),
            num_computed_prefill_tokens=prompt.copy(),
            num_computed_tokens_np=prompt.copy(),
        ),
        decode_query_len=1,
        use_pp=False,
        adaptive_verification=None,
        pcp_manager=None,
        vllm_config=_vllm_config(),
        get_model=lambda: None,
    )
    runner._halluguard_runtime = (OldRuntime if old else Runtime)(runner.vllm_config)
    table = records(runner)
    for r, data in requests.items():  # the add_requests hook: old kept every request, new the mitigated
        if old or data.sampling_params.extra_args is not None:
            table[r] = V2Request(runner, data)
    output = _output(ids, [])
    gather = GPUModelRunner.gather_batch_req_state
    gather = getattr(gather, "__wrapped__", gather)  # vLLM's, also where the plugin's hook is installed
    batch, _ = gather(runner, output, False)  # vLLM's own ordering of the step's rows
    step = old_follow_step if old else follow_step
    step(runner, _output(ids, list(requests.values())), batch)  # every request arrives
    assert len(runner._halluguard_runtime.requests) == mitigated
    return lambda: step(runner, output, batch)


def _time(fn: Callable[[], None], repeats: int = 7) -> float:
    """Median microseconds per call over ``repeats`` runs of ~20 ms each."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.02:
        fn()
        calls += 1
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    print("µs per decode step (median of 7)")
    print(f"{'rows':>5} {'mitigated':>9} | {'V1 old':>8} {'V1 new':>8} | {'V2 old':>8} {'V2 new':>8}")
    for n in ROWS:
        for mitigated in (0, len(MITIGATED)):
            times = [
                _time(v1_step(n, mitigated, OldRuntime)),
                _time(v1_step(n, mitigated, Runtime)),
                _time(v2_step(n, mitigated, old=True)),
                _time(v2_step(n, mitigated, old=False)),
            ]
            print(f"{n:>5} {mitigated:>9} | " + " ".join(f"{t:>8.2f}" for t in times[:2]) + " | "
                  + " ".join(f"{t:>8.2f}" for t in times[2:]))  # fmt: skip


if __name__ == "__main__":
    main()
