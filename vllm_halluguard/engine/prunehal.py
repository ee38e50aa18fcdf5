"""PruneHal in the engine (CPU path): per-layer keep masks over a request's visual keys.

For every mitigated decode row, the row ending with the prompt's last token (step 1: the prefill or its
last chunk, measured on that token's query only) and every configured layer, :func:`apply`

* recomputes the row's attention over the paged cache with the pruned visual keys masked (``key_mask``:
  an additive ``-inf``, identical to slicing them out) and writes it over the native kernel's output
  (only once something is pruned; before that the native output is already exact);
* measures the last query's head-averaged probabilities on the visual keys, exactly: explicit logits
  ``s_j = scale * q . k_j`` on the visual keys normalised by the row's LSE over the *kept* keys (the
  reference's softmax with pruned keys at ``-inf``), giving ``A_l`` and the per-token scores.

After the last configured layer of a step the request decides (:func:`decide`, batched over the
requests of a layer call; ``should_prune``: forced prune at ``force_step``, then the ``sqrt(r)``
majority vote against the history, at most ``t`` prunes), keeps the top ``floor(r |S_l|)`` per layer
and updates the history; the new masks apply from the next forward, as in the reference. The math is
:mod:`vllm_halluguard.methods.prunehal`.

State lives in ``RequestState.scratch["prunehal"]`` (a :class:`PruneState`): the number of visual
tokens differs per request (Qwen2-VL's dynamic resolution) and the state is dropped with the request.
Its tensors move to the layers' device at the request's first measured layer and the layer calls never
read anything back to the host (no ``.cpu()``, ``.item()``, boolean-mask indexing or ``nonzero``): the
decision runs on the device and the host reads it once per step, after the forward (:func:`collect`,
which says why that is race-free under async scheduling); tests/test_engine_prunehal_sync.py counts.
On the kernel path (the project's Triton kernel computes the decode rows with their key masks and
returns their LSE) the step's tables are made once per step in the metadata builder
(:meth:`PruneHalEngine.prepare_step`, :func:`tables`): per config, the rows' tokens, visual positions,
block-table rows and state (keep masks of every configured layer, prune count, history) stacked. A layer
call then runs a fixed op sequence per config group whatever its row count: the lane's key mask in one
write (:meth:`PruneHalEngine.lane_mask`), one gather of the ``Nv`` visual keys of every row (no V, no
other key), the statistics (:func:`measure`); after the last configured layer one batched decision
per run of equal visual token counts (:func:`decide_group`), whose rows each request takes on its next
use (:class:`Decided`). Untested on a GPU: the op counts are CPU measurements.
A preempted request starts over and replays its decode steps one per step (:mod:`.replay`), deciding
its prunes again at the same steps. The decode rows of a layer call are measured together
(:func:`apply_batch`: one padded gather, of K only until something is pruned, and one batched masked
attention); the per-row :func:`apply` is the same computation for one row.
A request without an image is refused at admission (``requests.check_inputs``).

The reclaiming variant (``selection="shared"`` over all decoder layers, best with
``granularity="block"``): after each prune the prompt blocks that no layer reads any more are handed to
:mod:`.reclaim`, which nulls them in the worker's block table and frees them in vLLM's block pool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from vllm_halluguard.engine import cache_io, reclaim
from vllm_halluguard.engine.base import (
    NATIVE,
    ROW_SINKS,
    Backend,
    EngineMethod,
    KeptKeys,
    Route,
    RowSinks,
    RowSpan,
)
from vllm_halluguard.engine.cache_io import CacheIO
from vllm_halluguard.engine.cpu_cache import page_ids
from vllm_halluguard.engine.images import visual_positions
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import DeviceRows, RequestState, Row, queue_to_host, worker_log
from vllm_halluguard.engine.tp import head_mean
from vllm_halluguard.kernels import cpu_native, paged
from vllm_halluguard.kernels.reference import (
    attention_logits,
    attention_logits_padded,
    attention_rows,
    attention_rows_padded,
)
from vllm_halluguard.methods.errors import SpecError
from vllm_halluguard.methods.prunehal import (
    PruneHalConfig,
    prune_step,
    scores_statistic,
    select_keep,
    visual_groups,
)

if TYPE_CHECKING:
    from vllm_halluguard.methods import MethodConfig

logger = logging.getLogger(__name__)

#: Traces of this many most recent PruneHal requests are kept per worker (``Runtime.logs[LOG]``).
MAX_LOGGED_REQUESTS = 256
LOG = "prunehal_log"
#: ``Runtime.ext`` key: ``{id(state): state}`` of the requests with decisions the host has not read.
UNREAD = "prunehal_unread"
#: ``StepPlan.prepared`` key: the torch path's :class:`TorchGroup` tables of a row list, by its id.
GROUP_OF = "prunehal_group_of"
#: ``Runtime.ext`` key: the step tables of a layer call made without a plan (unit harnesses).
STEP_TABLES = "prunehal_step_tables"


@dataclass
class Decision:
    """A decision the host has not read yet: row ``row`` of ``fired [B]`` and ``keep [B, n, Nv]`` after step
    ``step``, host buffers (pinned on CUDA) of the request's decision group that a copy queued behind the
    decision fills; on CUDA the copy is non-blocking and complete once ``event`` is."""

    step: int
    fired: torch.Tensor | list[bool]  # a host tensor, or (read at once on the host) a list
    keep: torch.Tensor
    event: Any = None  # torch.cuda.Event, or None where the tensors can be read at once
    row: int = 0


@dataclass
class Decided:
    """The device results of one batched decision (:func:`prune_step`): row ``j`` is the state of its
    ``j``-th request, which takes it on first use (:class:`_Row`), so a decision writes nothing per row."""

    keep: torch.Tensor  # [B, n, Nv]
    count: torch.Tensor  # [B]
    hist_sum: torch.Tensor  # [B, n]
    hist_n: torch.Tensor  # [B]
    A: torch.Tensor  # [B, n]
    scores: torch.Tensor  # [B, n, Nv]
    #: The kernel path's group that decided (its rows' visual positions serve the next step's tables).
    group: Group | None = None


class _Row:
    """A :class:`PruneState` tensor that may still be a row of its request's last :class:`Decided`: read
    or written, the state first takes its rows (:meth:`PruneState.settle`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = "_" + name

    def __get__(self, st: PruneState | None, owner: type | None = None) -> torch.Tensor:
        if st is None:  # on the class: the descriptor itself
            return cast(torch.Tensor, self)
        st.settle()
        return cast(torch.Tensor, st.__dict__[self.name])

    def __set__(self, st: PruneState, value: torch.Tensor) -> None:
        st.settle()
        st.__dict__[self.name] = value


@dataclass
class PruneState:
    """One request's PruneHal state; per-layer tensors are indexed like ``layers``.

    The tensors the layers read and write (``keep``, ``count``, history, ``A``, ``scores``) move to the
    layers' device at the request's first measured layer (:func:`on_device`) and stay there: a layer call
    reads and writes them on the device only. The host learns each decision later (``pending``, read by
    :func:`collect`) and keeps its own copy of the masks (``host_keep``) for the records and the reclaim.
    """

    visual: torch.Tensor  # [Nv] positions of the image tokens in the prompt (host)
    layers: tuple[int, ...]
    #: Torch path: this step's measurements so far: layer index -> (the layer call's A [B], scores
    #: [B, Nv_max], row b); stacked into ``A`` and ``scores`` once, at the decision (the kernel path keeps
    #: them per config group: :class:`Group`).
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    req_id: str = ""
    admission: int = 1  # how many times the worker admitted the request (1 + preemptions)
    reclaim: bool = False  # fully pruned prompt blocks go back to the pool
    freed: set[int] = field(default_factory=set)  # logical blocks handed to the reclaim
    visual_dev: torch.Tensor | None = None  # ``visual`` on the layers' device
    groups: torch.Tensor | None = None  # [Nv] visual_groups on the layers' device (block granularity)
    num_groups: int = 1
    host_keep: torch.Tensor | None = None  # [n, Nv] the masks as of the last decision the host read
    host_kept: list[bool] = field(default_factory=list)  # per layer: nothing pruned (as ``host_keep``)
    visual_list: list[int] = field(default_factory=list)  # ``visual`` as Python ints
    pending: list[Decision] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)  # layer -> its index in ``layers``
    pruned_layers: frozenset[int] = frozenset()  # layers with a pruned key, as ``host_kept``
    #: The kernel path's last decision, not yet taken into the tensors below: ``(results, row)``.
    decided: tuple[Decided, int] | None = None

    keep = _Row()  # [n, Nv] bool
    count = _Row()  # [1] prunes so far
    hist_sum = _Row()  # [1, n]
    hist_n = _Row()  # [1]
    A = _Row()  # [n] statistic of the last decided step
    scores = _Row()  # [n, Nv] per-token scores of the last decided step

    def settle(self) -> None:
        """Take the rows of the last decision (:attr:`decided`) as this request's tensors (views)."""
        if self.decided is None:
            return
        d, j = self.decided
        self.decided = None
        self.__dict__.update(
            _keep=d.keep[j], _count=d.count[j : j + 1], _hist_sum=d.hist_sum[j : j + 1],
            _hist_n=d.hist_n[j : j + 1], _A=d.A[j], _scores=d.scores[j],
        )  # fmt: skip

    def __post_init__(self) -> None:
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.last_layer = max(self.layers, default=-1)
        self.all_layers = frozenset(self.layers)

    @classmethod
    def fresh(cls, visual: torch.Tensor, layers: tuple[int, ...], record: dict[str, Any]) -> PruneState:
        """The state before step 1 (the prompt's last token): everything kept, no history."""
        n, nv = len(layers), visual.numel()
        st = cls(
            visual=visual,
            layers=layers,
            record=record,
            host_keep=torch.ones(n, nv, dtype=torch.bool),
            host_kept=[True] * n,
            visual_list=visual.tolist(),
        )
        st.keep, st.count = torch.ones(n, nv, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
        st.hist_sum, st.hist_n = torch.zeros(1, n), torch.zeros(1, dtype=torch.long)
        st.A, st.scores = torch.zeros(n), torch.zeros(n, nv)
        return st

    def keep_on_host(self) -> torch.Tensor:
        """The keep masks as the host knows them: as of the last decision :func:`collect` read (``pending``
        holds the later ones), on every device."""
        assert self.host_keep is not None
        return self.host_keep

    def all_kept(self, i: int) -> bool:
        """Whether nothing is pruned in layer index ``i``, from host data only (no read back): ``False``
        also where a decision is still unread (the caller then masks, which is exact either way)."""
        return not self.pending and self.host_kept[i]


def on_device(st: PruneState, cfg: PruneHalConfig, device: torch.device) -> None:
    """Move the state the layers use to ``device`` (once per request: host-to-device copies, never a read
    back), with the visual positions and, for block granularity, their groups."""
    if st.visual_dev is not None and st.visual_dev.device == device:
        return
    if cfg.granularity == "block":
        groups = visual_groups(st.visual, cfg.block)
        v = st.visual_list  # the positions as host ints (no tensor read): ``groups``' largest index + 1
        st.num_groups = max(v) // cfg.block - v[0] // cfg.block + 1 if v else 1
        st.groups = _to(groups, device)
    st.visual_dev = _to(st.visual, device)
    st.keep, st.count = _to(st.keep, device), _to(st.count, device)
    st.hist_sum, st.hist_n = _to(st.hist_sum, device), _to(st.hist_n, device)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
        x = x.pin_memory()  # a non-blocking copy (pageable memory would wait for the stream)
    return x.to(device, non_blocking=True)


def init_state(runtime: Any, state: RequestState, cached: Any) -> None:
    """Create the request's :class:`PruneState` at admission (called by ``Runtime._admit``). A request
    resumed after a preemption starts over: it replays its decode steps (:mod:`.replay`), and its
    record counts the admissions after the first (``resumed``)."""
    cfg = cast(PruneHalConfig, state.config)
    admissions = runtime.ext.setdefault("prunehal_admissions", {})
    admissions[state.req_id] = admissions.get(state.req_id, 0) + 1
    image_token_id = getattr(runtime.hf_config, "image_token_id", None)
    visual = visual_positions(cached, image_token_id)
    layers = tuple(cfg.layers or ())
    nv = visual.numel()
    if nv == 0:
        logger.warning("halluguard: prunehal request %s has no image tokens; it will not prune", state.req_id)
    record: dict[str, Any] = {
        "prompt_len": state.prompt_len,
        "num_visual": nv,
        "layers": list(layers),
        "steps": 0,
        "prunes": [],
        "reclaimable_blocks": 0,
        "freed_blocks": 0,
    }
    if admissions[state.req_id] > 1:
        record["resumed"] = admissions[state.req_id] - 1
    runtime.remember(LOG, state.req_id, record, MAX_LOGGED_REQUESTS)
    st = PruneState.fresh(visual, layers, record)
    st.req_id, st.admission = state.req_id, admissions[state.req_id]
    st.reclaim = cfg.frees_blocks and set(layers) == set(range(runtime.num_layers))
    runtime.ext[reclaim.READ_DECISIONS] = read_decisions
    state.scratch["prunehal"] = st


def apply(call: LayerCall, row: Row) -> None:
    """Masked attention, visual statistics and (after the last layer) the prune decision of one row."""
    state = row.request
    cfg = cast(PruneHalConfig, state.config)
    st: PruneState | None = state.scratch.get("prunehal")
    if st is None or cfg.is_noop() or st.visual.numel() == 0:
        return
    if ROW_SINKS in state.scratch:
        raise RuntimeError("prunehal: a composition's sinks need the batched torch path (apply_batch)")
    start, end, seq_len = call.span(row)
    pos = seq_len - 1
    i = st.index.get(call.layer)
    if i is None or seq_len < state.prompt_len or (seq_len > state.prompt_len and end - start != 1):
        return  # rows before the prompt's last token are never touched
    # the prompt's last token (the end of the prefill or of its last chunk) is step 1, measured on its
    # query only; a decode row is step seq_len - prompt_len + 1
    start = end - 1
    q = call.query[start:end]
    on_device(st, cfg, q.device)
    keep = st.keep[i]
    if st.all_kept(i) and call.gather_batch is not None:  # nothing pruned: the LSE from K alone
        k = call.gather_batch([row.index], [seq_len], values=False)[0][0]
        lse = torch.logsumexp(attention_logits(q, k, call.scale, torch.tensor([pos])), dim=-1)
    else:
        k, v = call.gather(row.index, seq_len)
        key_mask = None
        if not st.all_kept(i):
            key_mask = torch.ones(seq_len, dtype=torch.bool, device=q.device)
            key_mask[st.visual_dev] = keep
        out, lse, _ = attention_rows(q, k, v, call.scale, torch.tensor([pos]), key_mask=key_mask)
        if key_mask is not None:
            call.output[start:end] = out
    hq, hkv = q.shape[1], k.shape[1]
    qf = q[0].float().reshape(hkv, hq // hkv, -1)
    logits = torch.einsum("kgd,skd->kgs", qf, k[st.visual_dev].float()).reshape(hq, -1) * call.scale
    probs = torch.exp(logits - lse[0, :, None]) * keep  # [Hq, Nv]; pruned keys have probability 0
    _store(call, [(row, st, i)], head_mean(probs.float(), -2)[None], keep[None])


def apply_batch(call: LayerCall, rows: list[Row]) -> None:
    """:func:`apply` for several rows (decode rows and rows ending with the prompt's last token), each
    measured on its last token: one padded gather and one batched masked attention, with no per-row tensor
    op. Nothing is read back from the device (the keep masks and visual positions stay there)."""
    hit = None if call.plan is None else call.plan.prepared.get((GROUP_OF, id(rows)))
    if hit is not None and hit[0] is rows:  # the step's group of these rows (made at its first layer call)
        t = hit[1]
        if call.layer in t.group.index:
            _torch_layer(call, t, t.group)
        return
    todo: list[tuple[Row, PruneState, int]] = []
    device = call.query.device
    for row in rows:
        state = row.request
        st: PruneState | None = state.scratch.get("prunehal")
        if st is None or (st.visual_dev is None and (state.config.is_noop() or not st.visual_list)):
            continue
        i = st.index.get(call.layer)
        seq_len, prompt_len = call.seq_lens[row.index], state.prompt_len
        if i is None or seq_len < prompt_len or (seq_len > prompt_len and not call.is_single(row)):
            continue  # rows before the prompt's last token are never touched
        if st.visual_dev is None or st.visual_dev.device != device:
            on_device(st, cast(PruneHalConfig, state.config), device)
        todo.append((row, st, i))
    if not todo:
        return
    assert call.gather_batch is not None
    batch_rows = [row.index for row, _, _ in todo]
    seq_lens = [call.seq_lens[r] for r in batch_rows]
    found = _row_sinks(todo)  # a composition's sinks: those rows' output is ours too
    on = None if found is None else [_takes(f, call.layer) for f in found]
    masked = [b for b, (_, st, i) in enumerate(todo) if not st.all_kept(i) or (on is not None and on[b])]
    pruned = bool(masked)
    torch_path = call.plan is not None and getattr(call.plan, "rows", None) is None and call.io is not None
    if torch_path:  # the step's tables, made once (:func:`_torch_tables`)
        t = _torch_tables(call, todo, batch_rows, seq_lens)
        if t.group is not None:
            # every row in the group: the step's other layer calls go straight to it
            if len(todo) == len(rows):
                call.plan.prepared[(GROUP_OF, id(rows))] = (rows, t)  # holds ``rows``: its id stays unique
            _torch_layer(call, t, t.group)
            return
        visual, real, last, keep = t.visual, t.real, t.last, _layer_keep(t.keep, todo)
        if pruned:
            k, v, key_mask = call.gather_batch(batch_rows, seq_lens, values=True)
        else:  # K only: before something is pruned the native kernel's output is already exact
            k, v, key_mask = call.io.read_keys(t.ids, t.s_max), None, t.valid
    else:
        # V only once something is pruned: before that the native kernel's output is already exact
        on_dev = None if pruned else _keys_on_device(call, batch_rows, max(seq_lens))
        if on_dev is not None:
            (k, key_mask), v = on_dev, None
        else:
            k, v, key_mask = call.gather_batch(batch_rows, seq_lens, values=pruned)
        visual, real = _padded_visual(call, todo)
        keep = _layer_keep(None, todo)
        last = _last_tokens(call, batch_rows)
    q = call.query.index_select(0, last)
    hq = q.shape[1]
    index = visual[:, None, :].expand(-1, hq, -1)
    if pruned:  # pruned visual keys off, in every row at once (a row that prunes nothing drops nothing)
        drop = torch.zeros(key_mask.shape[0], key_mask.shape[1] + 1, dtype=torch.uint8, device=device)
        drop.scatter_(1, torch.where(real, visual, key_mask.shape[1]), (~keep).to(torch.uint8))
        key_mask = key_mask & (drop[:, :-1] == 0)
        sinks = None if found is None or on is None else _layer_sinks(found, on, hq)
        out, _, probs = attention_rows_padded(q, k, v, call.scale, key_mask, sinks)
        if len(masked) < len(todo):  # the others keep the native kernel's output
            sel = torch.tensor(masked, device=device)
            out, last = out.index_select(0, sel), last.index_select(0, sel)
        call.output.index_copy_(0, last, out.to(call.output.dtype))
        on_visual = probs.gather(-1, index)
    else:  # the probabilities on the visual keys only
        logits = attention_logits_padded(q, k, call.scale, key_mask)
        lse = torch.logsumexp(logits, dim=-1)
        on_visual = torch.exp(logits.gather(-1, index) - lse[..., None])
    _store(call, todo, head_mean((on_visual * keep[:, None, :]).float(), -2), keep)  # over every rank's heads


def _layer_keep(stacked: torch.Tensor | None, todo: list[tuple[Row, PruneState, int]]) -> torch.Tensor:
    """The rows' keep masks ``[B, Nv_max]`` of this layer: one op from the step's stacked masks
    (:attr:`TorchTables.keep`) where the rows share the layer's index, else padded row by row."""
    indices = {i for _, _, i in todo}
    if stacked is not None and len(indices) == 1:
        return stacked[:, indices.pop()]
    return torch.nn.utils.rnn.pad_sequence([st.keep[i] for _, st, i in todo], batch_first=True)


def _row_sinks(todo: list[tuple[Row, PruneState, int]]) -> list[RowSinks | None] | None:
    """The rows' sinks handed over by their compositions (:class:`~vllm_halluguard.engine.base.RowSinks`,
    native CPU path), or ``None`` where no row has any."""
    found = [row.request.scratch.get(ROW_SINKS) for row, _, _ in todo]
    return found if any(f is not None for f in found) else None


def _takes(sinks: RowSinks | None, layer: int) -> bool:
    """Whether a row with ``sinks`` takes them in ``layer``."""
    return sinks is not None and (sinks.layers is None or layer in sinks.layers)


def _layer_sinks(found: list[RowSinks | None], on: list[bool], hq: int) -> torch.Tensor:
    """The rows' sink logits ``[B, Hq]`` in a layer (``found``: :func:`_row_sinks`; ``on``: which rows take
    them there, :func:`_takes`; ``-inf`` elsewhere)."""
    sinks = torch.full((len(found), hq), float("-inf"))
    for b, (f, used) in enumerate(zip(found, on, strict=True)):
        if used and f is not None:
            sinks[b] = f.sinks
    return sinks


@dataclass
class TorchTables:
    """The torch path's tables of a step's measured rows, the same in every layer (:func:`_torch_tables`)."""

    #: [B, n_blocks] the rows' pages (:func:`~vllm_halluguard.engine.cpu_cache.page_ids`; for the native
    #: kernel their block table rows as they are, with ``valid`` and ``real`` left out)
    ids: torch.Tensor
    rows: list[int]  # the rows' indices in the batch
    valid: torch.Tensor | None  # [B, s_max] each row's keys
    s_max: int
    last: torch.Tensor  # [B] the flat index of each row's last token
    visual: torch.Tensor  # [B, Nv_max] visual positions (padded with 0)
    real: torch.Tensor | None  # [B, Nv_max] which are real
    #: ``[B, L, Nv]`` the rows' keep masks as of the step's start (a decision replaces them after the last
    #: layer that reads them), where the rows have as many layers and visual tokens (else ``None``).
    keep: torch.Tensor | None
    #: The rows' whole step as one group, where they share a config, layers and visual token count.
    group: TorchGroup | None = None


@dataclass
class TorchGroup:
    """The torch path's rows of one config, layer list and visual token count in one step: their state
    stacked once (from their last joint decision as it is), a fixed op sequence per layer call
    (:func:`_torch_layer`) and one decision after the last layer (:func:`_decide_torch`)."""

    cfg: PruneHalConfig
    states: list[PruneState]
    steps: list[int]  # each row's decision step (seq_len - prompt_len + 1)
    index: dict[int, int]  # layer -> its index in the rows' ``layers``
    last_layer: int
    keep: torch.Tensor  # [B, L, Nv] the keep masks as of the step's start (:attr:`TorchTables.keep`)
    count: torch.Tensor  # [B]
    hist_sum: torch.Tensor  # [B, L]
    hist_n: torch.Tensor  # [B]
    blocks: torch.Tensor | None  # [B, Nv] visual_groups (block granularity)
    num_groups: int
    #: Per layer index: the rows whose keys the host does not know to be all kept (reworked there), and
    #: their index into the rows where that is not every row.
    masked: list[list[int]]
    select: list[torch.Tensor | None]
    padded: bool  # some row is shorter than the longest (its padding's V is zeroed)
    parts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> head-averaged [B, Nv]
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> statistic [B] (native)
    masks: torch.Tensor | None = None  # [B, L, s_max] every layer's key masks, made at the first masked layer
    heads: torch.Tensor | None = None  # [B, Hq, Nv] the visual positions per query head
    #: The native kernel's (:func:`~vllm_halluguard.engine.cache_io.native_views`) inputs, where it serves
    #: the step: the rows' key counts [B] and, per layer index, which rows it writes [L, B].
    lens: torch.Tensor | None = None
    write: torch.Tensor | None = None
    #: ``[B, L, Hq]`` fp32: the sink logits its compositions hand the rows, per layer index (``-inf``: none).
    sinks: torch.Tensor | None = None


def _torch_layer(call: LayerCall, t: TorchTables, g: TorchGroup) -> None:
    """One layer call of the torch path for a :class:`TorchGroup`: K (and V where something is pruned)
    read from the step's pages, the masked attention written over the native output of the rows that
    prune here, the head-averaged visual probabilities kept for the decision. One call of the native CPU
    kernel where it serves (:func:`~vllm_halluguard.kernels.cpu_native.prunehal_layer`), else the same
    torch ops whatever the row count."""
    i = g.index[call.layer]
    views = cache_io.native_views(call) if g.write is not None else None
    if views is not None:  # one native call: attention, statistics and the pruned rows' output
        assert g.lens is not None and g.write is not None
        g.parts[i], g.stats[i] = cpu_native.prunehal_layer(
            call.query, t.last, *views, t.ids, g.lens, t.visual, g.keep, g.write, call.output, call.scale, i,
            g.cfg.statistic, sinks=g.sinks,
        )  # fmt: skip
        if call.layer == g.last_layer:
            _decide_torch(call.runtime, g)
        return
    if t.valid is None:  # tables made for the native kernel (a layer it cannot serve: never seen)
        t.ids, t.valid = page_ids(t.ids, torch.tensor(call.seq_lens)[t.rows], t.s_max, call.io.block_size)
    keep, valid = g.keep[:, i], t.valid
    q = call.query.index_select(0, t.last)
    if g.heads is None:
        g.heads = t.visual[:, None, :].expand(-1, q.shape[1], -1)
    k = call.io.read_keys(t.ids, t.s_max)
    if g.masked[i]:
        if g.masks is None:  # valid keys, the visual ones as kept in each layer
            b, n, nv = g.keep.shape
            g.masks = valid[:, None, :].expand(b, n, -1).clone()
            g.masks.scatter_(2, t.visual[:, None, :].expand(b, n, nv), g.keep)
        v = call.io.read_values(t.ids, t.s_max)
        if g.padded:
            v = v.masked_fill(~valid[:, :, None, None], 0)
        sinks = None if g.sinks is None else g.sinks[:, i]
        out, _, probs = attention_rows_padded(q, k, v, call.scale, g.masks[:, i], sinks)
        last, select = t.last, g.select[i]
        if select is not None:  # the others keep the native kernel's output
            out, last = out.index_select(0, select), last.index_select(0, select)
        call.output.index_copy_(0, last, out.to(call.output.dtype))
        on_visual = probs.gather(-1, g.heads)
    else:  # the probabilities on the visual keys only
        logits = attention_logits_padded(q, k, call.scale, valid)
        lse = torch.logsumexp(logits, dim=-1)
        on_visual = torch.exp(logits.gather(-1, g.heads) - lse[..., None])
    g.parts[i] = head_mean((on_visual * keep[:, None, :]).float(), -2)  # over every rank's heads
    if call.layer == g.last_layer:
        _decide_torch(call.runtime, g)


def _decide_torch(runtime: Any, g: TorchGroup) -> None:
    """The decisions of a :class:`TorchGroup`'s requests after this step, in one :func:`prune_step` (or,
    after the native kernels, one :func:`~vllm_halluguard.kernels.cpu_native.prunehal_vote`); each
    request takes its row on first use (:class:`Decided`). On a CPU device the host reads the vote at
    once (free there), so a step where no request prunes selects no masks."""
    if len(g.parts) != len(g.index):
        raise RuntimeError(f"prunehal: layer indices {set(range(len(g.index))) - set(g.parts)} not measured")
    keep = g.keep
    head_avg = torch.stack([g.parts[i] for i in range(len(g.index))], 1)  # [B, L, Nv]
    steps = torch.tensor(g.steps, device=keep.device)
    cpu = keep.device.type == "cpu"
    if len(g.stats) == len(g.index):  # the native kernels measured every layer: the vote in one call too
        A, scores = torch.stack([g.stats[i] for i in range(len(g.index))], 1), head_avg
        vote = cpu_native.prunehal_vote(A, g.hist_sum, g.hist_n, g.count, steps, g.cfg)
        fired, count, hist_sum, hist_n = vote
        new_keep = keep
        if bool(fired.any()):  # the host reads the vote at once on CPU: masks only for a step that prunes
            selected = select_keep(scores, keep, g.cfg, g.blocks, g.num_groups)
            new_keep = torch.where(fired[:, None, None], selected, keep)
    else:
        A, scores = scores_statistic(head_avg, keep, g.cfg.statistic)
        fired, new_keep, count, hist_sum, hist_n = prune_step(
            steps, g.cfg, keep, g.count, A, scores, g.hist_sum, g.hist_n, g.blocks, num_groups=g.num_groups,
            skip_idle=cpu,
        )  # fmt: skip
    g.parts, g.stats = {}, {}
    done = Decided(new_keep, count, hist_sum, hist_n, A, scores)
    _hand_out(runtime.ext.setdefault(UNREAD, {}), done, fired, g.states, g.steps, copy=not cpu)


def _torch_tables(
    call: LayerCall, todo: list[tuple[Row, PruneState, int]], batch_rows: list[int], seq_lens: list[int]
) -> TorchTables:
    """:class:`TorchTables` of the rows, made at the step's first layer call that measures them and kept
    in its plan (the layer calls of a step see the same rows), with no tensor op per row."""
    bs = call.io.block_size
    key = ("prunehal_torch", bs, tuple(batch_rows))
    hit = call.plan.prepared.get(key)
    if hit is None:
        s_max = max(seq_lens)
        table = call.plan.block_table[batch_rows].long()
        sts = [st for _, st, _ in todo]
        counts = [len(st.visual_list) for st in sts]
        positions = [cast(torch.Tensor, st.visual_dev) for st in sts]
        same = len(set(counts)) == 1 and len({len(st.layers) for st in sts}) == 1
        visual = torch.stack(positions) if same else torch.nn.utils.rnn.pad_sequence(positions, True)
        last = _last_tokens(call, batch_rows)
        kinds = {(cast(PruneHalConfig, row.request.config), st.layers) for row, st, _ in todo}
        one = same and len(kinds) == 1
        native = one and cache_io.native_views(call) is not None
        if native:  # the native kernel reads the table rows as they are and masks by their lengths
            ids, valid, real = table, None, None
        else:
            ids, valid = page_ids(table, torch.tensor(seq_lens), s_max, bs)
            real = torch.arange(visual.shape[1])[None, :] < torch.tensor(counts)[:, None]
        if one:
            group = _torch_group(todo, last, seq_lens, s_max, native)
            hit = TorchTables(ids, batch_rows, valid, s_max, last, visual, real, group.keep, group)
        else:
            keep = torch.stack([st.keep for st in sts]) if same else None
            hit = TorchTables(ids, batch_rows, valid, s_max, last, visual, real, keep)
        call.plan.prepared[key] = hit
    return hit


def _torch_group(
    todo: list[tuple[Row, PruneState, int]], last: torch.Tensor, seq_lens: list[int], s_max: int, native: bool
) -> TorchGroup:
    """The rows' :class:`TorchGroup`: their state stacked (their last decision's tensors where they decided
    together last step, in this order: no op), and for the native kernel its per-row inputs."""
    sts = [st for _, st, _ in todo]
    cfg = cast(PruneHalConfig, todo[0][0].request.config)
    d = _last_decided(sts, from_kernel=False)
    if d is not None:
        keep, count, hist_sum, hist_n = d.keep, d.count, d.hist_sum, d.hist_n
    else:
        keep, count = torch.stack([st.keep for st in sts]), torch.cat([st.count for st in sts])
        hist_sum, hist_n = torch.cat([st.hist_sum for st in sts]), torch.cat([st.hist_n for st in sts])
    blocks = None
    if cfg.granularity == "block":
        blocks = torch.stack([cast(torch.Tensor, st.groups) for st in sts])
    n, rows = len(sts[0].layers), len(sts)
    found, sinks = _row_sinks(todo), None
    on = [[False] * n for _ in sts]
    if found is not None:  # a composition's sinks, in the layers they apply to
        on = [[_takes(f, layer) for layer in sts[0].layers] for f in found]
        hq = next(f for f in found if f is not None).sinks.numel()
        per_row = torch.stack([torch.full((hq,), float("-inf")) if f is None else f.sinks for f in found])
        sinks = torch.where(torch.tensor(on)[:, :, None], per_row[:, None, :], float("-inf"))
    masked = [[b for b, st in enumerate(sts) if not st.all_kept(i) or on[b][i]] for i in range(n)]
    select = [torch.tensor(m, device=last.device) if 0 < len(m) < rows else None for m in masked]
    lens = write = None
    if native:
        lens = torch.tensor(seq_lens)
        write = torch.tensor([[b in m for b in range(rows)] for m in map(set, masked)])
    return TorchGroup(
        cfg, sts, [s - row.request.prompt_len + 1 for s, (row, _, _) in zip(seq_lens, todo, strict=True)],
        dict(sts[0].index), sts[0].last_layer, keep, count, hist_sum, hist_n, blocks,
        max(st.num_groups for st in sts), masked, select, min(seq_lens) < s_max, lens=lens, write=write,
        sinks=sinks,
    )  # fmt: skip


def _padded_visual(
    call: LayerCall, todo: list[tuple[Row, PruneState, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' visual positions ``[B, Nv_max]`` (padded with position 0) and which are real, on the
    device; made once for the rows of a step (kept in its plan: the layer calls of a step see the same
    rows)."""
    prepared = getattr(call.plan, "prepared", None)
    key = ("prunehal_visual", *(id(st.visual_dev) for _, st, _ in todo))
    hit = None if prepared is None else prepared.get(key)
    if hit is not None:
        return hit[1], hit[2]
    pad = torch.nn.utils.rnn.pad_sequence
    vis = [cast(torch.Tensor, st.visual_dev) for _, st, _ in todo]
    visual = pad(vis, batch_first=True)
    real = pad([torch.ones_like(x, dtype=torch.bool) for x in vis], batch_first=True)
    if prepared is not None:
        prepared[key] = (vis, visual, real)  # ``vis`` keeps the ids of the key alive
    return visual, real


def _last_tokens(call: LayerCall, rows: list[int]) -> torch.Tensor:
    """The flat indices of the rows' last tokens: from the step's device tables on the kernel path (no
    host data), else from the host's query starts."""
    tables = getattr(call.plan, "rows", None)
    if tables is not None:
        return tables.last_token.index_select(0, tables.index(rows))
    return torch.tensor([call.query_start_loc[r + 1] - 1 for r in rows], device=call.query.device)


def _store(
    call: LayerCall, todo: list[tuple[Row, PruneState, int]], head_avg: torch.Tensor, keep: torch.Tensor
) -> None:
    """Each row's statistic and scores from its head-averaged visual probabilities ``head_avg [B, Nv]``
    (padded), written into its state on the device; after the last configured layer, the decisions of
    the rows' requests."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    deciding: list[tuple[PruneState, PruneHalConfig, int]] = []
    for b, (row, st, i) in enumerate(todo):
        cfg = cast(PruneHalConfig, row.request.config)
        if cfg.statistic not in stats:
            stats[cfg.statistic] = scores_statistic(head_avg, keep, cfg.statistic)
        A, scores = stats[cfg.statistic]
        st.parts[i] = (A, scores, b)
        if call.layer == st.last_layer:
            deciding.append((st, cfg, call.seq_lens[row.index] - row.request.prompt_len + 1))
    if deciding:
        decide(call.runtime, deciding)


def _keys_on_device(call: LayerCall, rows: list[int], s_max: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K ``[B, s_max, Hkv, D]`` of the call's ``rows`` and their causal masks ``[B, s_max]``, indexed on the
    device from the step's device tables (kernel path: ``call.plan.rows``) and the cache's kernel views,
    with no host data (a padded position reads the row's last key, masked); ``None`` without them."""
    tables = getattr(call.plan, "rows", None)
    io = getattr(call.gather, "__self__", None)
    views = io.kernel_views() if tables is not None and isinstance(io, CacheIO) else None
    if views is None:
        return None
    assert io is not None and tables is not None
    index = tables.index(rows)
    last = tables.position.index_select(0, index)[:, None]  # [B, 1] seq_len - 1
    positions = torch.arange(s_max, device=last.device)[None, :]
    k = paged.gather_keys(views[0], io.block_table.index_select(0, index), torch.minimum(positions, last))
    return k, positions <= last


@dataclass
class Group:
    """The kernel lane's decode rows of one config in one step, as tensors on the layers' device, made
    once per step (:func:`tables`); rows ordered by their visual token count (equal counts adjacent).

    The keep masks, prune count and history are those of the step's start: a decision replaces them at
    the request's last configured layer, after which no layer of the step reads them, and it applies
    from the next forward."""

    cfg: PruneHalConfig
    states: list[PruneState]
    layers: tuple[int, ...]
    index: dict[int, int]  # layer -> its index in ``layers``
    token: torch.Tensor  # [B] flat index of the row's token
    row: torch.Tensor  # [B] the row's index in the batch (the step's tables)
    position: torch.Tensor  # [B] the token's position (seq_len - 1)
    step: torch.Tensor  # [B] the decision's step (seq_len - prompt_len + 1)
    visual: torch.Tensor  # [B, Nv_max] visual positions (padded with 0)
    pad: torch.Tensor  # [B, Nv_max] bool: padding
    keep: torch.Tensor  # [B, L, Nv_max] bool keep masks (padded False)
    count: torch.Tensor  # [B]
    hist_sum: torch.Tensor  # [B, L]
    hist_n: torch.Tensor  # [B]
    blocks: torch.Tensor | None  # [B, Nv_max] visual_groups (block granularity)
    block_table: torch.Tensor  # [B, max_blocks] the rows' block tables
    runs: list[tuple[int, int, int]]  # (start, end, Nv) of rows with equal visual token counts
    steps: list[int]  # ``step`` on the host (the decisions' records)
    masked: frozenset[int]  # layers where the host does not know that nothing is pruned in every row
    last_layer: int  # where the group decides
    #: This step's measurements so far: layer index -> (A [B], scores [B, Nv_max]); stacked at the decision.
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: By the cache's block size: the cache blocks and in-block offsets of ``visual``.
    _addresses: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def addresses(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._addresses.get(block_size)
        if out is None:
            blocks = self.block_table.long().gather(
                1, torch.div(self.visual, block_size, rounding_mode="floor")
            )
            out = self._addresses[block_size] = (blocks, self.visual % block_size)
        return out


@dataclass
class Tables:
    """PruneHal's rows of one hook call: their config groups and, for the kernel lane's rows, each group's
    flat indices into the lane's key mask (where :meth:`PruneHalEngine.lane_mask` writes)."""

    groups: list[Group]
    lane: list[torch.Tensor] | None = None


def tables(plan: Any, rows: list[Row], lp: Any = None) -> Tables:
    """The :class:`Tables` of ``rows`` in this step, made on first use and kept in ``plan.prepared``: the
    builder makes those of the kernel lane's row lists (:meth:`PruneHalEngine.prepare_step`), so a layer
    call only looks them up (by the list's identity; another list, e.g. a composition's, by its rows).
    The groups are shared by every list holding the same rows of a config (their measurements too)."""
    entry = plan.prepared.get(("prunehal", id(rows)))
    if entry is not None and entry[0] is rows:
        return cast(Tables, entry[1])
    key = ("prunehal", tuple(row.index for row in rows), id(lp))
    out = plan.prepared.get(key)
    if out is None:
        out = plan.prepared[key] = _build(plan, rows, lp)
    plan.prepared[("prunehal", id(rows))] = (rows, out)  # holds ``rows``: its id stays unique
    return cast(Tables, out)


def _lane_of(plan: Any, rows: list[Row]) -> Any:
    """The layer plan whose kernel lane hands PruneHal ``rows`` (the builder's list, or a composition's
    member list, which the composition registers), if any."""
    from vllm_halluguard.engine.compose import LANE_OF

    member = plan.prepared.get((LANE_OF, id(rows)))
    if member is not None and member[0] is rows:
        return member[1]
    for lp in (plan.default, *plan.layers.values()):
        if any(r is rows for _, r in lp.lane):
            return lp
    return None


def _build(plan: Any, rows: list[Row], lp: Any) -> Tables:
    """Group the rows by config and stack their state, from the step's device tables (``plan.rows``: no
    host data is copied)."""
    dev = plan.rows
    device = dev.last_token.device
    by_cfg: dict[PruneHalConfig, list[tuple[Row, PruneState]]] = {}
    for row in rows:
        st = _state(row)
        if st is not None:
            by_cfg.setdefault(cast(PruneHalConfig, row.request.config), []).append((row, st))
    out = Tables([], [] if lp is not None else None)
    at = {r.index: j for j, r in enumerate(lp.rework)} if lp is not None else {}
    for cfg, members in by_cfg.items():
        members.sort(key=lambda m: m[1].visual.numel())  # stable: equal counts keep the batch order
        for _, st in members:
            on_device(st, cfg, device)
        indices = [row.index for row, _ in members]
        key = ("prunehal", cfg, tuple(indices))
        g = plan.prepared.get(key)
        if g is None:
            g = plan.prepared[key] = _group(plan, cfg, members, dev.index(indices))
        out.groups.append(g)
        if out.lane is not None:  # flat indices into the lane's mask; padding rewrites the row's last key
            lane = dev.index([at[i] for i in indices])[:, None]
            where = torch.where(g.pad, g.position[:, None], g.visual)
            out.lane.append(lane * lp.width + where)
    return out


def _group(plan: Any, cfg: PruneHalConfig, members: list[tuple[Row, PruneState]], idx: torch.Tensor) -> Group:
    sts = [st for _, st in members]
    pad = torch.nn.utils.rnn.pad_sequence
    nvs = [st.visual.numel() for st in sts]
    last = _last_decided(sts)
    blocks = None
    if last is not None:  # the same requests decided together last step: their results as they are
        assert last.group is not None
        keep, count, hist_sum, hist_n = last.keep, last.count, last.hist_sum, last.hist_n
        visual, padding, blocks = last.group.visual, last.group.pad, last.group.blocks
    else:
        vis = [cast(torch.Tensor, st.visual_dev) for st in sts]
        visual = pad(vis, batch_first=True)
        padding = ~pad([torch.ones_like(x, dtype=torch.bool) for x in vis], batch_first=True)
        if cfg.granularity == "block":
            blocks = pad([cast(torch.Tensor, st.groups) for st in sts], batch_first=True)
        count = torch.cat([st.count for st in sts])
        hist_sum, hist_n = torch.cat([st.hist_sum for st in sts]), torch.cat([st.hist_n for st in sts])
        if len(set(nvs)) == 1:
            keep = torch.stack([st.keep for st in sts])
        else:  # [B, Nv_max, L] padded, then [B, L, Nv_max]
            keep = pad([st.keep.T for st in sts], batch_first=True).transpose(1, 2)
    runs, lo = [], 0
    for j in range(1, len(nvs) + 1):
        if j == len(nvs) or nvs[j] != nvs[lo]:
            runs.append((lo, j, nvs[lo]))
            lo = j
    layers = sts[0].layers
    position = plan.rows.position.index_select(0, idx)
    g = Group(
        cfg, sts, layers, dict(sts[0].index), plan.rows.last_token.index_select(0, idx), idx, position,
        position - plan.rows.prompt_len.index_select(0, idx) + 2, visual, padding, keep,
        count, hist_sum, hist_n, blocks, plan.block_table.index_select(0, idx), runs,
        [plan.seq_lens[row.index] - row.request.prompt_len + 1 for row, _ in members],
        frozenset(layer for i, layer in enumerate(layers) if any(not st.all_kept(i) for st in sts)),
        sts[0].last_layer,
    )  # fmt: skip
    if plan.block_size > 0:
        g.addresses(plan.block_size)
    return g


def _last_decided(sts: list[PruneState], from_kernel: bool = True) -> Decided | None:
    """The one decision all of ``sts`` took last (on the kernel path, with ``from_kernel``), as its rows
    ``0..B-1`` in this order, and not yet taken into their tensors (then the group's state tensors are
    that decision's, with no op per row)."""
    first = sts[0].decided
    if first is None or (from_kernel and first[0].group is None) or first[0].keep.shape[0] != len(sts):
        return None
    d = first[0]
    if all(st.decided is not None and st.decided[0] is d and st.decided[1] == j for j, st in enumerate(sts)):
        return d
    return None


def _tables(call: LayerCall, rows: list[Row]) -> Tables:
    """The step's tables of ``rows``: the plan's on the kernel path. Elsewhere (a composition's rows on
    the torch path, unit harnesses without a plan) made from the call's host data, copied to the device,
    and kept for the step's other layer calls (in the plan, else in the runtime)."""
    plan = call.plan
    if plan is not None and getattr(plan, "rows", None) is not None:
        return tables(plan, rows)
    io = getattr(call.gather, "__self__", None)
    if not isinstance(io, CacheIO):
        raise NotImplementedError("prunehal's kernel path reads a cache with kernel views only")
    key = (
        "prunehal_host",
        *((row.index, call.seq_lens[row.index], id(row.request.scratch.get("prunehal"))) for row in rows),
    )
    if plan is not None:
        hit = plan.prepared.get(key)
    else:
        hit = call.runtime.ext.get(STEP_TABLES)
        hit = hit[1] if hit is not None and hit[0] == key else None
    if hit is not None:
        return cast(Tables, hit)
    from types import SimpleNamespace

    n, device = len(call.seq_lens), call.query.device
    prompt_lens = [-1] * n
    for row in rows:
        prompt_lens[row.index] = row.request.prompt_len
    qsl = call.query_start_loc
    host = torch.tensor([[qsl[i + 1] - 1 for i in range(n)], [s - 1 for s in call.seq_lens], prompt_lens])
    t = host.to(device)
    dev = DeviceRows(t[0], t[1], t[2], t[2], _arange=torch.arange(n, device=device))
    step = SimpleNamespace(
        rows=dev, block_table=io.block_table, block_size=0, prepared={}, seq_lens=call.seq_lens
    )
    out = _build(step, rows, None)
    if plan is not None:  # the tables hold the rows' states: the ids in the key stay theirs
        plan.prepared[key] = out
    else:
        call.runtime.ext[STEP_TABLES] = (key, out)
    return out


def measure(call: LayerCall, g: Group, lse: torch.Tensor) -> None:
    """The statistic and scores of group ``g``'s rows in this layer from the kernel's LSE over the kept
    keys and the visual keys' logits: a fixed op sequence over all rows; after the group's last layer,
    its decision (:func:`decide_group`)."""
    io = getattr(call.gather, "__self__", None)
    views = io.kernel_views() if isinstance(io, CacheIO) else None
    if views is None:
        raise NotImplementedError("prunehal's kernel path reads a cache with kernel views only")
    i = g.index[call.layer]
    keep = g.keep[:, i]  # [B, Nv_max]; padding False
    k = views[0][g.addresses(views[0].shape[1])]  # [B, Nv, Hkv, D]: the visual keys only
    q = call.query.index_select(0, g.token)  # [B, Hq, D]
    b, hq, hkv = q.shape[0], q.shape[1], k.shape[2]
    qf = q.float().reshape(b, hkv, hq // hkv, -1)
    logits = torch.einsum("bkgd,bskd->bkgs", qf, k.float()).reshape(b, hq, -1) * call.scale
    row_lse = lse.index_select(0, g.token).float()  # [B, Hq]
    probs = torch.exp(logits - row_lse[:, :, None]) * keep[:, None, :]  # pruned, padded keys: 0
    # reduced on the layer's device (vLLM's all-reduce on CUDA takes device tensors only)
    g.parts[i] = scores_statistic(head_mean(probs, -2), keep, g.cfg.statistic)
    if call.layer == g.last_layer:
        decide_group(call.runtime, g)


def decide_group(runtime: Any, g: Group) -> None:
    """The decisions of group ``g``'s requests after this step (they apply from the next forward): one
    :func:`prune_step` per run of equal visual token counts, on the device, nothing read back."""
    if len(g.parts) != len(g.layers):
        missing = [layer for i, layer in enumerate(g.layers) if i not in g.parts]
        raise RuntimeError(f"prunehal: layers {missing} were not measured in this step")
    A = torch.stack([g.parts[i][0] for i in range(len(g.layers))], 1)  # [B, L]
    scores = torch.stack([g.parts[i][1] for i in range(len(g.layers))], 1)  # [B, L, Nv_max]
    g.parts = {}
    unread = runtime.ext.setdefault(UNREAD, {})
    for lo, hi, nv in g.runs:
        sts = g.states[lo:hi]
        if lo == 0 and hi == len(g.states) and nv == g.keep.shape[-1]:  # the whole group
            rows, wide = [g.step, g.count, A, g.hist_sum, g.hist_n], [g.keep, scores, g.blocks]
        else:
            part = slice(lo, hi)
            rows = [x[part] for x in (g.step, g.count, A, g.hist_sum, g.hist_n)]
            wide = [None if x is None else x[part, ..., :nv] for x in (g.keep, scores, g.blocks)]
        step, count0, a, hist_sum0, hist_n0 = rows
        keep0, sc, blocks = wide
        assert keep0 is not None and sc is not None
        fired, keep, count, hist_sum, hist_n = prune_step(
            step, g.cfg, keep0, count0, a, sc, hist_sum0, hist_n0, blocks,
            num_groups=max(st.num_groups for st in sts), skip_idle=False,
        )  # fmt: skip
        done = Decided(keep, count, hist_sum, hist_n, a, sc, g if len(g.runs) == 1 else None)
        _hand_out(unread, done, fired, sts, g.steps[lo:hi], copy=True)


def _hand_out(
    unread: dict[int, PruneState], done: Decided, fired: torch.Tensor, sts: list[PruneState],
    steps: list[int], copy: bool,
) -> None:  # fmt: skip
    """Request ``j`` of ``sts`` takes row ``j`` of the batched decision ``done`` on first use, and the host
    learns it later (:class:`Decision`, read by :func:`collect`): from host buffers a copy queued behind
    the stream fills (:func:`queue_to_host`), or, without ``copy``, from the tensors as they are (on the
    host, where nothing writes them again). Host bookkeeping only: no tensor op per row."""
    host_fired: torch.Tensor | list[bool]
    if copy:
        (host_fired, host_keep), event = queue_to_host(fired, done.keep)
    else:  # on the host: the vote read once here, not once per request
        host_fired, host_keep, event = fired.tolist(), done.keep, None
    for j, st in enumerate(sts):
        st.decided = (done, j)
        st.pending.append(Decision(steps[j], host_fired, host_keep, event, j))
        unread[id(st)] = st


def decide(runtime: Any, items: list[tuple[PruneState, PruneHalConfig, int]]) -> None:
    """The decisions of requests ``(state, config, step)`` after their step ``step`` (1 = the prompt's
    last token, then one per decode row); they apply from the next forward. Requests sharing a config
    and a visual token count decide in one batched :func:`prune_step`, on the device and without reading
    anything back: the host reads the decisions later (:func:`collect`; at once on a CPU device)."""
    groups: dict[tuple[PruneHalConfig, int], list[tuple[PruneState, int]]] = {}
    for st, cfg, step in items:
        if len(st.parts) != len(st.layers):
            missing = [layer for i, layer in enumerate(st.layers) if i not in st.parts]
            raise RuntimeError(f"prunehal: layers {missing} were not measured in step {step}")
        parts, nv = [st.parts[i] for i in range(len(st.layers))], st.visual.numel()
        st.A = torch.stack([a[b] for a, _, b in parts])
        st.scores = torch.stack([sc[b, :nv] for _, sc, b in parts])
        st.parts = {}
        groups.setdefault((cfg, st.visual.numel()), []).append((st, step))
    for (cfg, _), members in groups.items():
        sts = [st for st, _ in members]
        device = sts[0].keep.device
        blocks = None
        if cfg.granularity == "block":
            blocks = torch.stack([cast(torch.Tensor, st.groups) for st in sts])
        steps = torch.cat([torch.full((1,), step, dtype=torch.long, device=device) for _, step in members])
        fired, keep, count, hist_sum, hist_n = prune_step(
            steps,
            cfg,
            torch.stack([st.keep for st in sts]),
            torch.cat([st.count for st in sts]),
            torch.stack([st.A for st in sts]),
            torch.stack([st.scores for st in sts]),
            torch.cat([st.hist_sum for st in sts]),
            torch.cat([st.hist_n for st in sts]),
            blocks,
            num_groups=max(st.num_groups for st in sts),
            skip_idle=False,
        )
        (host_fired, host_keep), event = queue_to_host(fired, keep)
        unread = runtime.ext.setdefault(UNREAD, {})
        for j, (st, step) in enumerate(members):
            st.keep, st.count, st.hist_sum, st.hist_n = (
                keep[j],
                count[j : j + 1],
                hist_sum[j : j + 1],
                hist_n[j : j + 1],
            )
            st.pending.append(Decision(step, host_fired, host_keep, event, j))
            unread[id(st)] = st


def collect(runtime: Any, st: PruneState, wait: bool) -> None:
    """The host reads the request's unread decisions, oldest first, into its record (and the reclaim):
    every one with ``wait``, else those whose copy has completed. It reads the decisions' host buffers
    only, never the device state.

    Race-free under async scheduling: the layers read and write the device state on the compute stream
    only, in launch order (a decision replaces the masks with new tensors, which the next step's layers
    read after it), and the host reads a decision's pinned copy only after its event completed, so it
    never sees a half-written mask and never makes the stream wait; the records may trail the forward by
    a step. The host reads once per step, after the forward: at the end of the step (:func:`read_decisions`,
    from vLLM's ``sample_tokens``, where vLLM's V1 runner reads the sampled tokens back), and, for what
    is still unread (V2, or a copy not yet complete under async scheduling), in the next ``plan_step``;
    without waiting, except for reclaiming requests, which run with synchronous scheduling only
    (``check_inputs``): vLLM has read the step's sampled tokens back, so the forward is done and the
    wait costs nothing. ``release`` and the records' readers (:func:`prunehal_trace`, ``worker_stats``)
    wait."""
    while st.pending:
        d = st.pending[0]
        if d.event is not None:
            if not wait and not d.event.query():
                return
            d.event.synchronize()
        st.pending.pop(0)
        _record(runtime, st, d)
    getattr(runtime, "ext", {}).get(UNREAD, {}).pop(id(st), None)


def collect_all(runtime: Any) -> None:
    """:func:`collect` with ``wait`` for every PruneHal request of the worker."""
    for state in getattr(runtime, "requests", {}).values():
        st = state.scratch.get("prunehal")
        if st is not None and st.pending:
            collect(runtime, st, wait=True)


def read_decisions(runtime: Any) -> None:
    """The end of a step (:data:`reclaim.READ_DECISIONS`, from ``sample_tokens``): :func:`collect` for the
    requests that decided in it, waiting for the reclaiming ones only (see :func:`collect`)."""
    for st in list(runtime.ext.get(UNREAD, {}).values()):
        collect(runtime, st, wait=st.reclaim)


def _record(runtime: Any, st: PruneState, d: Decision) -> None:
    rec = st.record
    rec["steps"] = d.step
    if not bool(d.fired[d.row]):
        return
    st.host_keep = d.keep[d.row]
    keep = st.host_keep.tolist()
    st.host_kept = [all(layer) for layer in keep]
    pairs = zip(st.layers, st.host_kept, strict=True)
    st.pruned_layers = frozenset(layer for layer, kept in pairs if not kept)
    rec["prunes"].append({"step": d.step, "kept": [sum(layer) for layer in keep], "keep": keep})
    blocks = pruned_block_ids(st, keep, runtime.block_size, runtime.num_layers)
    rec["reclaimable_blocks"] = len(blocks)
    new = [b for b in blocks if b not in st.freed] if st.reclaim else []
    if new:
        runtime.stats["prunehal_reclaiming_requests"] += not st.freed
        st.freed.update(new)
        rec["freed_blocks"] = len(st.freed)
        runtime.stats["prunehal_freed_blocks"] += len(new)
        reclaim.queue(runtime, st.req_id, st.admission, new)


def pruned_block_ids(st: PruneState, keep: list[list[bool]], block_size: int, num_layers: int) -> list[int]:
    """Logical KV blocks of the prompt whose every token is pruned in every decoder layer, from the keep
    masks ``keep [n][Nv]`` the host read (Python data: no tensor op).

    Only such blocks can go back to the pool (vLLM's block table is shared by all layers); if the
    config prunes a subset of layers, the others still read every block and none qualifies.
    """
    if set(st.layers) != set(range(num_layers)) or not keep or not keep[0]:
        return []
    gone: dict[int, int] = {}
    for pos, kept in zip(st.visual_list, zip(*keep, strict=True), strict=True):
        if not any(kept):
            gone[pos // block_size] = gone.get(pos // block_size, 0) + 1
    return sorted(b for b, n in gone.items() if n == block_size)  # the prompt's tokens of a block


def prunehal_trace(worker: Any, clear: bool = False) -> dict[str, dict[str, Any]]:
    """``LLM.collective_rpc(prunehal_trace)``: per-request PruneHal records of a worker, oldest first.

    Each record: ``prompt_len``, ``num_visual``, ``layers``, ``steps`` (last step decided, 1 = prefill),
    ``prunes`` (``{"step", "kept": per-layer counts, "keep": per-layer masks}`` after each prune) and
    ``reclaimable_blocks`` (the number of :func:`pruned_block_ids`) and ``freed_blocks`` (of them, the blocks
    given back to the pool; the reclaiming variant only). ``clear`` empties the log afterwards.
    """
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is not None:
        collect_all(runtime)
    return worker_log(worker, LOG, clear)


def _state(row: Row) -> PruneState | None:
    st: PruneState | None = row.request.scratch.get("prunehal")
    if st is None or row.request.config.is_noop() or st.visual.numel() == 0:
        return None
    return st


class PruneHalEngine(EngineMethod):
    """PruneHal: per-layer keep masks over the visual keys, decided after each decode step."""

    name = "prunehal"
    needs_image = True
    tensor_parallel = True  # statistics averaged over every rank's heads (engine/tp.py)
    pipeline_reason = "its prune vote reads every configured layer, and the layers sit on different stages"
    batched = True
    replays_decode = True  # each decode step's prune vote (engine/replay.py)
    gauges = ("prunehal_reclaimable_blocks",)
    #: ``prunehal_freed_blocks``: prompt blocks handed back to the pool (reclaiming variant), and
    #: ``prunehal_reclaiming_requests``: requests (admissions) that gave back at least one.
    counters = ("prunehal_freed_blocks", "prunehal_reclaiming_requests")

    init_state = staticmethod(init_state)
    apply = staticmethod(apply)
    apply_batch = staticmethod(apply_batch)

    def check_inputs(
        self, cfg: MethodConfig, images: Sequence[Any], prompt_len: int, vllm_config: Any
    ) -> None:
        """The reclaiming variant edits V1's block table and output (:mod:`.reclaim`), which V2 does not
        have, and its frees are step-exact only without async scheduling (tested that way only)."""
        if not cast(PruneHalConfig, cfg).frees_blocks:
            return
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise SpecError(
                "prunehal with selection='shared' (block reclaim) needs vLLM's V1 model runner "
                "(VLLM_USE_V2_MODEL_RUNNER=0); use selection='per_layer' on V2",
                "unsupported",
            )
        if getattr(vllm_config.scheduler_config, "async_scheduling", False):
            raise SpecError(
                "prunehal with selection='shared' (block reclaim) needs synchronous scheduling "
                "(--no-async-scheduling); use selection='per_layer' with async scheduling",
                "unsupported",
            )

    def run(self, call: LayerCall, rows: list[Row]) -> None:
        """Every row is measured on its last token, so all rows go to one :func:`apply_batch`."""
        if call.gather_batch is None:
            for row in rows:
                apply(call, row)
        elif rows:
            apply_batch(call, rows)

    def route(self, row: Row, span: RowSpan, backend: Backend) -> Route:
        """Decode rows in the configured layers: torch path where keys are pruned (the native kernel has no
        key mask); with the kernel, every configured layer (output, mask and LSE in one launch)."""
        st = _state(row)
        if st is None or span.num_tokens != 1 or span.seq_len - 1 < row.request.prompt_len:
            return NATIVE
        if backend.kernel:
            return Route(rework=frozenset(st.layers))
        # a decision the host has not read yet counts as pruned: the masked torch path is exact either way
        return Route(rework=st.all_layers if st.pending else st.pruned_layers)

    def observes(self, row: Row, span: RowSpan, backend: Backend) -> bool:
        """The row that ends with the prompt's last token (step 1), and decode rows on the torch path."""
        st = _state(row)
        if st is None or span.seq_len < row.request.prompt_len:
            return False
        if span.seq_len == row.request.prompt_len:
            return True
        return span.num_tokens == 1 and not backend.kernel

    def kept_keys(self, row: Row) -> KeptKeys | None:
        """The visual keys' masks as of the step's start, where the host knows a key pruned (or a decision
        unread): the layers its torch route reworks."""
        st = _state(row)
        if st is None or not (st.pruned_layers or st.pending):
            return None
        if st.decided is not None:  # the row of its last batched decision, not taken yet (no op)
            d, j = st.decided
            return KeptKeys(st.visual, d.keep, st.index, j)
        return KeptKeys(st.visual, st.keep, st.index)

    def sink_layers(self, row: Row, span: RowSpan) -> frozenset[int]:
        """Its layers, for a decode row (the batched torch path computes them with the sinks handed over)."""
        st = _state(row)
        if st is None or span.num_tokens != 1 or span.seq_len - 1 < row.request.prompt_len:
            return frozenset()
        return st.all_layers

    def needs_attention(self, row: Row, span: RowSpan) -> bool:
        """A request with image tokens, on the step that ends its prompt and on its decode steps."""
        st = _state(row)
        prompt_len = row.request.prompt_len
        return st is not None and (
            span.seq_len == prompt_len or (span.num_tokens == 1 and span.seq_len > prompt_len)
        )

    def kernel_args(self, call: LayerCall, row: Row) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The row's key mask, built where its keep masks live (the layer's device) without a read back;
        none while the host knows nothing is pruned in this layer."""
        st = _state(row)
        assert st is not None
        i = st.index[call.layer]
        if st.all_kept(i):
            return None, None
        visual = st.visual if st.visual_dev is None else st.visual_dev
        mask = torch.ones(call.seq_lens[row.index], dtype=torch.bool, device=st.keep.device)
        mask[visual] = st.keep[i]
        return None, mask

    def kernel_sinks(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        return None

    def kernel_mask(self, call: LayerCall, row: Row) -> torch.Tensor | None:
        return self.kernel_args(call, row)[1]

    def kernel_sinks_static(self, row: Row) -> bool:
        return True  # no sinks; the mask is made in the layer, on the device

    def prepare_step(self, plan: Any, rows: list[Row], kernel: bool) -> None:
        """Kernel lane: the step's :class:`Tables` of ``rows``, made in the builder (a layer call finds
        them). The torch path needs none."""
        if kernel and getattr(plan, "rows", None) is not None:
            tables(plan, rows, _lane_of(plan, rows))

    def lane_mask(
        self, call: LayerCall, lp: Any, rows: list[Row], mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The rows' key masks from the step's stacked keep masks: one write per config group, none while
        the host knows nothing is pruned in this layer (:attr:`Group.masked`)."""
        t = _tables(call, rows) if call.plan is not None else None
        if t is None or t.lane is None:
            return super().lane_mask(call, lp, rows, mask)
        for g, index in zip(t.groups, t.lane, strict=True):
            if call.layer not in g.masked:
                continue
            if mask is None:
                mask = torch.ones(len(lp.rework), lp.width, dtype=torch.bool, device=g.keep.device)
            values = g.keep[:, g.index[call.layer]] | g.pad  # padded entries rewrite a kept key
            mask.view(-1).index_put_((index.view(-1),), values.view(-1))
        return mask

    def after_kernel(
        self, call: LayerCall, rows: list[Row], lse: torch.Tensor, entropy: torch.Tensor
    ) -> None:
        """Visual statistics from the kernel's LSE over the kept keys and the visual keys' logits, per
        config group of the step's :class:`Tables` (a fixed op sequence whatever the row count): one
        gather of the ``Nv`` visual keys per row (no V, no other key)."""
        for g in _tables(call, rows).groups:
            measure(call, g, lse)

    def release(self, runtime: Any, state: RequestState) -> None:
        """Finished or preempted. Blocks not yet nulled in the worker's table are another allocation's
        after a recompute (the scheduler drops such stale reports too). The host reads the request's last
        decisions first (its record is complete)."""
        st = state.scratch.get("prunehal")
        if st is not None and st.pending:
            collect(runtime, st, wait=True)
        reclaim.forget(runtime, state.req_id)

    def finished(self, runtime: Any, req_id: str) -> None:
        runtime.ext.get("prunehal_admissions", {}).pop(req_id, None)

    def plan_step(
        self, runtime: Any, rows: list[Row], scheduler_output: Any, input_batch: Any, requests: Any
    ) -> None:
        """The host reads the decisions of the last steps (:func:`collect`: once per step, before this
        step's forward; waiting only for reclaiming requests), then nulls the blocks freed after the last
        step in the worker's block table, before any read."""
        for row in rows:
            st = row.request.scratch.get("prunehal")
            if st is not None and st.pending:
                collect(runtime, st, wait=st.reclaim)
        reclaim.apply_pending(runtime, input_batch, requests)

    def worker_stats(self, runtime: Any) -> dict[str, int]:
        """KV blocks of active requests pruned in every layer (could return to the pool)."""
        collect_all(runtime)
        log = runtime.logs.get(LOG, {})
        blocks = sum(rec["reclaimable_blocks"] for rid, rec in log.items() if rid in runtime.requests)
        return {"prunehal_reclaimable_blocks": blocks}
