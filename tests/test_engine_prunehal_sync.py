"""PruneHal's layer calls never wait for the device (issue 27): on a simulated accelerator
(``tests/helpers/device_sim.py``) a layer call reads nothing back to the host (``.cpu()``, ``.item()``,
``.tolist()``, ``bool()``) and copies nothing to the device once a request's state is there; the host
reads the step's decisions once, after the forward (``plan_step``), and they are those of a run on the
host. Both layer paths run: the kernel path's ``after_kernel`` (decode rows) and the torch path's ``run``
(the prompt's last token, which the kernel path also measures there)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers.device_sim import OnDevice, on_device, simulated_device
from vllm_halluguard.engine import prunehal, tp
from vllm_halluguard.engine.cache_io import SplitViews
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.plan import device_rows
from vllm_halluguard.engine.prunehal import PruneHalEngine, PruneState
from vllm_halluguard.engine.state import RequestState, Row, StepView
from vllm_halluguard.kernels.reference import attention_logits
from vllm_halluguard.methods.prunehal import PruneHalConfig

HQ, HKV, D, BS = 4, 2, 8, 8
LAYERS = (0, 1)
PROMPTS = [30, 21]  # the image at positions 2..17 of both prompts
STEPS = 4  # the prompt's last token, then three decode steps
VISUAL = torch.arange(2, 18)
CONFIGS = [
    PruneHalConfig(r=0.5, t=3, layers=LAYERS),  # forced prune at step 2, then the vote (both)
    PruneHalConfig(r=0.5, t=2, layers=LAYERS, granularity="block", block=BS, statistic="mass"),
]


class HostToDevice(TorchFunctionMode):
    """Counts host-to-device copies inside :func:`simulated_device`: moves of host tensors to the device,
    tensors made there from Python data, and host tensors indexing or written into device tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and not isinstance(args[0], OnDevice):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            self.count += func is torch.Tensor.cuda or (
                isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda"
            )
        elif func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device", "")).startswith("cuda"):
            self.count += 1
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_) and isinstance(
            args[0], OnDevice
        ):
            rest = [a for a in args[1:] if isinstance(a, torch.Tensor)]
            rest += [
                a
                for a in (args[1] if len(args) > 1 and isinstance(args[1], tuple) else ())
                if isinstance(a, torch.Tensor)
            ]
            self.count += any(not isinstance(t, OnDevice) and t.dim() > 0 for t in rest)
        return func(*args, **kwargs)


def _world(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    n = max(PROMPTS) + STEPS
    k = [torch.randn(n, HKV, D, generator=g) for _ in PROMPTS]
    v = [torch.randn(n, HKV, D, generator=g) for _ in PROMPTS]
    q = torch.randn(STEPS, len(LAYERS), len(PROMPTS), HQ, D, generator=g)
    return k, v, q


def _cache(k, v, move):
    """A paged cache holding both rows (blocks interleaved) and its block table."""
    n_blocks = -(-k[0].shape[0] // BS)
    kc = torch.zeros(2 * n_blocks + 1, BS, HKV, D)
    vc = torch.zeros_like(kc)
    table = torch.zeros(2, n_blocks, dtype=torch.int32)
    for r in range(2):
        ids = torch.arange(n_blocks) * 2 + r + 1
        table[r] = ids
        pos = torch.arange(k[r].shape[0])
        kc[ids[pos // BS], pos % BS], vc[ids[pos // BS], pos % BS] = k[r], v[r]
    return SplitViews(move(kc), move(vc), move(table))


def _rows() -> list[Row]:
    rows = []
    for r, (cfg, prompt) in enumerate(zip(CONFIGS, PROMPTS, strict=True)):
        state = RequestState(f"req{r}", r, cfg, prompt)
        record: dict[str, Any] = {"prompt_len": prompt, "steps": 0, "prunes": [], "reclaimable_blocks": 0}
        state.scratch["prunehal"] = PruneState.fresh(VISUAL.clone(), LAYERS, record)
        rows.append(Row(r, state))
    return rows


def _kernel_lse(q: torch.Tensor, k, rows: list[Row], seq_lens: list[int], layer: int) -> torch.Tensor:
    """What the kernel hands ``after_kernel``: each row's LSE over its kept keys (computed on the host)."""
    out = []
    for r, row in enumerate(rows):
        st = row.request.scratch["prunehal"]
        mask = torch.ones(seq_lens[r], dtype=torch.bool)
        mask[VISUAL] = st.keep[LAYERS.index(layer)].cpu()
        pos = torch.tensor([seq_lens[r] - 1])
        logits = attention_logits(q[r : r + 1], k[r][: seq_lens[r]], D**-0.5, pos, mask)
        out.append(torch.logsumexp(logits, -1))
    return torch.cat(out)


def _run(device: bool) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """Every layer call of :data:`STEPS` steps: ``(path, device-to-host, host-to-device)`` per call, and the
    requests' records."""
    k, v, q = _world()
    move = on_device if device else (lambda x: x)
    rows = _rows()
    runtime = SimpleNamespace(block_size=BS, num_layers=len(LAYERS), stats={}, ext={})
    counts: list[tuple[str, int, int]] = []
    h2d = HostToDevice()
    with simulated_device() as transfers, h2d:
        io = _cache(k, v, move)
        for step in range(STEPS):
            seq_lens = [p + step for p in PROMPTS]
            plan = None
            if step:  # the kernel path's step tables, made by the builder once per step
                cm = SimpleNamespace(
                    num_reqs=2, query_start_loc=move(torch.arange(3, dtype=torch.int32)),
                    seq_lens=move(torch.tensor(seq_lens, dtype=torch.int32)),
                )  # fmt: skip
                plan = SimpleNamespace(
                    rows=device_rows(cm, StepView(2, tuple(rows))), query_start_loc=[0, 1, 2],
                    seq_lens=seq_lens, block_table=io.block_table, block_size=BS, prepared={},
                    default=SimpleNamespace(lane=()), layers={},
                )  # fmt: skip
                PruneHalEngine().prepare_step(plan, rows, kernel=True)
            for j, layer in enumerate(LAYERS):
                query = move(q[step, j].clone())
                call = LayerCall(
                    layer=layer, scale=D**-0.5, query=query, output=torch.zeros_like(query),
                    query_start_loc=[0, 1, 2], seq_lens=seq_lens, slot_mapping=move(torch.tensor(seq_lens)),
                    runtime=runtime, gather=io.gather, write=io.write, gather_batch=io.gather_batch,
                    gather_slots=io.gather_slots, plan=plan,
                )  # fmt: skip
                lse = move(_kernel_lse(q[step, j], k, rows, seq_lens, layer)) if step else None
                before, h2d_before = len(transfers), h2d.count
                if step == 0:  # the prompt's last token: the torch path
                    PruneHalEngine().run(call, rows)
                else:
                    assert lse is not None
                    PruneHalEngine().after_kernel(call, rows, lse, torch.zeros_like(lse))
                path = "after_kernel" if step else "run"
                counts.append((path, len(transfers) - before, h2d.count - h2d_before))
            PruneHalEngine().plan_step(runtime, rows, None, None, {})  # the next step: the host reads
    return counts, [row.request.scratch["prunehal"].record for row in rows]


@pytest.fixture(scope="module")
def host_run():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tp, "tp_group", lambda: tp._SINGLE)
        return _run(device=False)


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch):
    """One rank without vLLM's process groups (tests/test_engine_tp_reduce.py runs several)."""
    monkeypatch.setattr(tp, "tp_group", lambda: tp._SINGLE)


def test_a_layer_call_neither_reads_back_nor_copies_to_the_device(host_run):
    counts, records = _run(device=True)
    assert len(counts) == STEPS * len(LAYERS)
    assert all(d2h == 0 for _, d2h, _ in counts), counts
    # the states move to the device at their first layer call (the prompt's last token, torch path)
    assert all(h2d == 0 for path, _, h2d in counts if path == "after_kernel"), counts
    assert records == host_run[1], "the host read the decisions of a run on the host"
    assert all(r["prunes"] for r in records), "both requests must have pruned"


def test_the_check_sees_a_deliberate_read_back(monkeypatch):
    """A regression inside the layer code: the head-averaged statistic taken to the host and back."""
    monkeypatch.setattr(prunehal, "head_mean", lambda x, dim: tp.head_mean(x, dim).cpu().to(x.device))
    counts, _ = _run(device=True)
    # one per reduction: the torch path's batch, the kernel path's config groups (one per config here)
    want = [1 if path == "run" else len(CONFIGS) for path, _, _ in counts]
    assert [d2h for _, d2h, _ in counts] == want, counts
