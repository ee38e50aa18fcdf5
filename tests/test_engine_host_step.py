"""Without an engine: the worker's per-step host work does nothing per plain row, on V1 (``Runtime.update``
after ``_update_states``) and V2 (the ``gather_batch_req_state`` hook). Plain requests are looked at
once, when they arrive; counted, not timed (``benchmarks/host_step.py`` times it)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np

from helpers.worker import FARSIGHT_C, KVSMOOTH, cached, make_runtime
from vllm_halluguard.engine import runner_v2, state
from vllm_halluguard.engine.runner_v2 import V2Request, keep_records, records

PLAIN = 64


class Touches(dict):
    """A dict that counts the lookups of each key (``[]``, ``in``, ``get``)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.seen: Counter[str] = Counter()

    def __getitem__(self, key):
        self.seen[key] += 1
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.seen[key] += 1
        return super().__contains__(key)

    def get(self, key, default=None):
        self.seen[key] += 1
        return super().get(key, default)


class Rows(list):
    """A batch's ``req_ids`` that counts how often it is iterated or indexed."""

    reads = 0

    def __iter__(self):
        Rows.reads += 1
        return super().__iter__()

    def __getitem__(self, item):
        Rows.reads += 1
        return super().__getitem__(item)


def _output(tokens: dict[str, int], new: list[str] = (), finished: set[str] = frozenset()) -> SimpleNamespace:
    return SimpleNamespace(
        finished_req_ids=set(finished),
        preempted_req_ids=set(),
        num_scheduled_tokens=dict(tokens),
        total_num_scheduled_tokens=sum(tokens.values()),
        scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()),
        scheduled_spec_decode_tokens={},
    )


def test_v1_steps_touch_no_plain_row_after_its_arrival():
    plain = [f"plain{i}" for i in range(PLAIN)]
    mitigated = {"c": FARSIGHT_C, "k": KVSMOOTH}
    ids = [*plain[:30], "c", *plain[30:], "k"]  # batch order
    requests = Touches({r: cached(r, computed=12) for r in plain})
    for r, cfg in mitigated.items():
        requests[r] = cached(r, cfg, [1] * 10, computed=10)
    index = Touches({r: i for i, r in enumerate(ids)})
    batch = SimpleNamespace(req_ids=Rows(ids), num_reqs=len(ids), req_id_to_index=index)
    runtime = make_runtime(capacity=8)
    tokens = dict.fromkeys(ids, 1)

    runtime.update(_output(tokens, new=ids), batch, requests)  # every request arrives
    assert all(requests.seen[r] <= 2 for r in plain), "a plain request is looked at when it arrives"
    assert [(row.index, row.request.req_id) for row in runtime.step.rows] == [(30, "c"), (PLAIN + 1, "k")]

    requests.seen.clear()
    index.seen.clear()
    Rows.reads = 0
    for _ in range(5):  # decode steps: nothing arrives
        runtime.update(_output(tokens), batch, requests)
        assert [row.index for row in runtime.step.rows] == [30, PLAIN + 1] and runtime.step.needs_attention
    assert not any(requests.seen[r] or index.seen[r] for r in plain), "no plain row is looked up"
    assert Rows.reads == 0, "the batch's rows are not walked"
    assert index.seen == Counter({"c": 5, "k": 5})

    # the mitigated requests finish: plain steps have no view and still walk nothing
    runtime.update(_output(dict.fromkeys(plain, 1), finished={"c", "k"}), batch, requests)
    assert runtime.step is None and runtime.requests == {}
    assert not any(requests.seen[r] or index.seen[r] for r in plain) and Rows.reads == 0


def _v2_runner(runtime, rows: dict[str, tuple[int, int]]) -> SimpleNamespace:
    """What the V2 runner's ``gather_batch_req_state`` (vLLM's and the hook) reads of the runner:
    request states indexed by slot (``rows``: request id -> (prompt length, computed tokens))."""
    slots = {r: i for i, r in enumerate(reversed(list(rows)))}  # slots in another order than the batch
    prompt = np.zeros(len(rows), dtype=np.int32)
    computed = np.zeros(len(rows), dtype=np.int32)
    for r, (p, c) in rows.items():
        prompt[slots[r]], computed[slots[r]] = p, c
    req_states = SimpleNamespace(
        req_id_to_index=slots,
        prefill_len=SimpleNamespace(np=prompt),
        num_computed_prefill_tokens=np.minimum(computed, prompt),
        num_computed_tokens_np=computed,
    )
    return SimpleNamespace(
        req_states=req_states,
        decode_query_len=1,
        use_pp=False,
        adaptive_verification=None,
        pcp_manager=None,
        _halluguard_runtime=runtime,
        vllm_config=SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context={})),
        get_model=lambda: None,
    )


def test_v2_keeps_no_record_and_touches_no_row_of_plain_requests():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    runner_v2.install_step_hooks()
    runtime = make_runtime(capacity=8)
    plain = {f"plain{i}": (12, 12) for i in range(PLAIN)}
    rows = {**dict(list(plain.items())[:20]), "c": (10, 10), **dict(list(plain.items())[20:]), "k": (10, 10)}
    runner = _v2_runner(runtime, rows)
    new = [
        SimpleNamespace(
            req_id=r,
            sampling_params=cached(r, {"c": FARSIGHT_C, "k": KVSMOOTH}.get(r)).sampling_params,
            prompt_token_ids=[1] * p,
            mm_features=None,
            num_computed_tokens=0,
        )
        for r, (p, _) in rows.items()
    ]
    output = _output(dict.fromkeys(rows, 1))
    output.scheduled_new_reqs = new
    keep_records(runner, output)
    assert set(records(runner)) == {"c", "k"} and all(
        isinstance(v, V2Request) for v in records(runner).values()
    )

    runner.__dict__[runner_v2._RECORDS] = table = Touches(records(runner))
    state.set_current(runtime)
    try:
        output.scheduled_new_reqs = [d for d in new if d.req_id in ("c", "k")]
        batch, _ = GPUModelRunner.gather_batch_req_state(runner, output, False)
        output.scheduled_new_reqs = []
        for _ in range(3):
            GPUModelRunner.gather_batch_req_state(runner, output, False)
    finally:
        state.set_current(None)
    assert not any(table.seen[r] for r in plain), "no plain row is looked up in the records"
    order = list(batch.req_ids)
    assert [(row.index, row.request.req_id) for row in runtime.step.rows] == sorted(
        (order.index(r), r) for r in ("c", "k")
    )
    assert records(runner)["c"].num_computed_tokens == 10, "a mitigated record follows its computed tokens"
