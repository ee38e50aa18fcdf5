"""SCR in the engine, worker side: the diagnostic's attention map, the selection and the residual edit.

An SCR request runs as two engine requests (:mod:`vllm_halluguard.engine.two_pass`): a hidden
*diagnostic* copy (prompt only, its one sampled token is thrown away), then the real request.

* **Diagnostic** (:func:`apply`, from the attention backend): at every diagnostic layer, each prompt
  row after the image (or only the last one, ``diag_rows="last"``) gets its exact softmax over the
  paged cache; its probabilities on the visual keys, averaged over heads, are summed. After the last
  diagnostic layer of the prompt's last chunk the map (mean over rows and layers) picks the sources
  and their neighbours on the patch grid (:func:`vllm_halluguard.methods.scr.select_sources`), filed
  under the real request's id.
* **Real prefill** (:func:`plan_step`, :func:`install_layer_hooks`): the wrapped decoder layers of the
  intervention range apply :func:`vllm_halluguard.methods.scr.apply_edit` to that request's
  visual rows of both ``hidden_states`` and ``residual`` (vLLM keeps the residual stream split in two;
  the edit is linear, so editing both edits their sum). Decode needs nothing: the edited K/V are cached.

* **Early exit**: a step whose batch holds only diagnostics skips the decoder layers after the last
  diagnostic layer (their output and KV are never read: the sampled token is dropped and the
  diagnostic's blocks are never read from the prefix cache).

A selection lives until its real request finishes; a preempted request is recomputed with the same one.
With tensor parallelism each rank sees its own heads, so the map is averaged across ranks: every rank
holds as many query heads (vLLM splits them evenly), so the mean of the ranks' head means is the mean
over all heads.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch

from vllm_halluguard.engine.base import EngineMethod
from vllm_halluguard.engine.images import patch_grid, visual_positions
from vllm_halluguard.engine.keys import SCR_PARENT_KEY
from vllm_halluguard.engine.layer import LayerCall
from vllm_halluguard.engine.state import RequestState, Row, current, queue_to_host, worker_log
from vllm_halluguard.engine.tp import rank_mean
from vllm_halluguard.kernels.reference import attention_logits
from vllm_halluguard.methods.scr import Grid, SCRConfig, Selection, apply_edit, select_sources

logger = logging.getLogger(__name__)

#: Selections and traces kept per worker (a selection whose request was aborted before it ran).
MAX_KEPT = 1024
LOG = "scr_log"


@dataclass
class DiagState:
    """A diagnostic request's running sums (``rows`` = query rows counted once, at the first layer)."""

    parent: str
    visual: torch.Tensor  # [Nv] image-token positions (host)
    grid: Grid
    layers: tuple[int, ...]
    after_image: int = 0  # the first position after the image (host data: no read in a layer)
    visual_dev: torch.Tensor | None = None  # ``visual`` on the layers' device, copied at admission
    map_sum: torch.Tensor | None = None  # [Nv] fp32, summed over rows and layers
    rows: int = 0


@dataclass
class PendingMap:
    """A diagnostic's finished map, on its way to the host: a copy into host memory queued behind the last
    diagnostic layer (pinned and non-blocking on CUDA, ``event`` after it). The host turns it into the
    selection when it next needs it (:func:`selection`), after the forward."""

    attn_map: torch.Tensor  # [Nv] fp32, host
    event: Any
    grid: Grid
    cfg: SCRConfig


@dataclass(frozen=True)
class EditPlan:
    """One request's edit in this step: flat batch rows of its image tokens, in grid order."""

    flat: torch.Tensor  # [Nv]
    selection: Selection  # sources [1, K] (-1 padded), owner [1, Nv]
    lam: float
    layers: frozenset[int]


@dataclass
class Worker:
    """Per-runner SCR state: selections by real request id, and this step's edits and early exit."""

    selections: OrderedDict[str, Selection | PendingMap]
    plan: tuple[EditPlan, ...] = ()
    skip_from: int | None = None
    hooked: bool = False


def worker(runtime: Any) -> Worker:
    return runtime.ext["scr"]


def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    while len(table) > MAX_KEPT:
        table.popitem(last=False)


def init_state(runtime: Any, state: RequestState, cached: Any) -> None:
    """Admission in the worker: a diagnostic gets a :class:`DiagState`, a real request its selection."""
    cfg = cast(SCRConfig, state.config)
    if cfg.is_noop():
        return
    parent = (cached.sampling_params.extra_args or {}).get(SCR_PARENT_KEY)
    visual = visual_positions(cached, getattr(runtime.hf_config, "image_token_id", None))
    if parent is not None:
        grid = patch_grid(runtime.model_type, cached, visual)
        layers = tuple(sorted(cfg.diag_layers or ()))
        after = int(visual.max()) + 1 if visual.numel() else 0  # host positions
        state.scratch["scr_diag"] = DiagState(parent, visual, grid, layers, after, _to_device(visual))
        return
    selection = selection_of(runtime, state.req_id)
    if selection is None:  # the scheduler queues it only after its diagnostic finished normally
        runtime.stats["scr_unedited"] += 1
        logger.error("halluguard: scr request %s has no diagnostic result; it runs unedited", state.req_id)
        return
    device_sel = Selection(_to_device(selection.sources), _to_device(selection.owner))  # once, at admission
    state.scratch["scr_edit"] = (visual, device_sel, cfg)  # the member config (the request may compose)


def apply(call: LayerCall, row: Row) -> None:
    """Diagnostic rows: add this layer's head-averaged attention of the rows after the image. The rows are
    a contiguous range of positions known on the host (no mask, no read back); at the last diagnostic
    layer of the prompt's last chunk the map is finished on the device and queued for the host."""
    st: DiagState | None = row.request.scratch.get("scr_diag")
    if st is None or call.layer not in st.layers:
        return
    start, end, seq_len = call.span(row)
    first, prompt_len = seq_len - (end - start), row.request.prompt_len
    diag_first = prompt_len - 1 if cast(SCRConfig, row.request.config).diag_rows == "last" else st.after_image
    lo, hi = max(diag_first, first), min(prompt_len, seq_len)  # the positions counted in this chunk
    if lo < hi:
        k, _ = call.gather(row.index, seq_len)
        q = call.query[start + lo - first : start + hi - first]
        logits = attention_logits(q, k, call.scale, torch.arange(lo, hi, device=k.device))
        if st.visual_dev is None or st.visual_dev.device != k.device:
            st.visual_dev = st.visual.to(k.device)  # the admission's copy went elsewhere (tests)
        probs = torch.softmax(logits, dim=-1).index_select(-1, st.visual_dev)  # [T, Hq, Nv]
        part = probs.mean(1).sum(0)
        st.map_sum = part if st.map_sum is None else st.map_sum + part
        if call.layer == st.layers[0]:
            st.rows += hi - lo
    if seq_len == prompt_len and call.layer == st.layers[-1]:
        _finish(call.runtime, row.request, st)


def _finish(runtime: Any, state: RequestState, st: DiagState) -> None:
    """The diagnostic's mean map, averaged across ranks on the device, queued for the host under the
    real request's id (:class:`PendingMap`)."""
    if st.map_sum is None or st.rows == 0:
        logger.warning("halluguard: scr diagnostic %s saw no text after the image", state.req_id)
        return
    attn_map = rank_mean(st.map_sum / (st.rows * len(st.layers))).float()  # equal head counts per rank
    (host,), event = queue_to_host(attn_map)
    _remember(
        worker(runtime).selections, st.parent, PendingMap(host, event, st.grid, cast(SCRConfig, state.config))
    )


def selection_of(runtime: Any, req_id: str) -> Selection | None:
    """The selection of real request ``req_id``, made from its diagnostic's map on first use (at its
    admission, after the diagnostic's forward: vLLM queues the real request once the diagnostic has
    finished, so its map's copy has completed and waiting costs nothing)."""
    table = worker(runtime).selections
    got = table.get(req_id)
    if isinstance(got, PendingMap):
        got = table[req_id] = _select(runtime, req_id, got)
    return got


def _select(runtime: Any, req_id: str, pending: PendingMap) -> Selection:
    if pending.event is not None:
        pending.event.synchronize()
    cfg, attn_map = pending.cfg, pending.attn_map
    picked = select_sources(
        attn_map, pending.grid, cfg.top_k, exclude_border=cfg.exclude_border, connectivity=cfg.connectivity
    )
    record = {
        "attn_map": attn_map.tolist(),
        "grid": list(pending.grid),
        "sources": picked.sources[0].tolist(),
        "owner": picked.owner[0].tolist(),
        "num_visual": int(attn_map.numel()),
    }
    runtime.remember(LOG, req_id, record, MAX_KEPT)
    return picked


def _to_device(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the platform's device (at admission, outside the forward's layers)."""
    from vllm.platforms import current_platform

    return x.to(torch.device(current_platform.device_type))


def plan_step(runtime: Any, scheduler_output: Any, input_batch: Any, requests: dict[str, Any]) -> None:
    """This step's edits (the real SCR requests whose image tokens are all scheduled in this step) and,
    for a batch of diagnostics only, the first decoder layer that can be skipped."""
    plans = []
    offset = 0
    scheduled = scheduler_output.num_scheduled_tokens
    for req_id in input_batch.req_ids[: input_batch.num_reqs]:
        n = scheduled.get(req_id, 0)
        state = runtime.requests.get(req_id)
        edit = state.scratch.get("scr_edit") if state is not None else None
        if edit is not None:
            visual, selection, cfg = edit
            computed = requests[req_id].num_computed_tokens
            inside = (visual >= computed) & (visual < computed + n)
            if bool(inside.all()):
                flat = visual - computed + offset
                flat = flat.to(selection.sources.device)  # once per step: the layers index on the device
                plans.append(EditPlan(flat, selection, cfg.lam, frozenset(cfg.layers or ())))
                runtime.stats["scr_edits"] += 1
            elif bool(inside.any()):  # two_pass keeps an image in one chunk and fails a request it cut
                runtime.stats["scr_split_images"] += 1
                logger.error(
                    "halluguard: scr request %s has its image split across chunks; not edited (the "
                    "scheduler fails it)",
                    req_id,
                )
        offset += n
    w = worker(runtime)
    w.plan = tuple(plans)
    # Early exit: a batch of diagnostics only needs the layers up to the last diagnostic layer.
    diags = [r.request.scratch.get("scr_diag") for r in runtime.step.rows] if runtime.step else []
    if diags and len(diags) == input_batch.num_reqs and all(d is not None for d in diags):
        w.skip_from = 1 + max(d.layers[-1] for d in diags)
        runtime.stats["scr_early_exits"] += 1


def _layer_forward(layer: int, forward: Any, positions: Any, hidden: Any, residual: Any, *a: Any, **kw: Any):
    """A decoder layer's forward with SCR: skipped for a diagnostic-only batch past the last diagnostic
    layer, else run and then edited for this step's plans."""
    runtime = current()
    if runtime is None:
        return forward(positions, hidden, residual, *a, **kw)
    w = worker(runtime)
    if w.skip_from is not None and layer >= w.skip_from:
        return hidden, hidden if residual is None else residual  # nothing after this is ever read
    output = forward(positions, hidden, residual, *a, **kw)
    for plan in w.plan:
        if layer not in plan.layers:
            continue
        for t in output:  # hidden_states and residual: the stream is their sum
            idx, sel = plan.flat, plan.selection  # on the layers' device (made in plan_step)
            rows = t.index_select(0, idx).unsqueeze(0)
            edited = apply_edit(rows, sel.sources, sel.owner, plan.lam)
            t.index_copy_(0, idx, edited[0].to(t.dtype))
    return output


def install_layer_hooks(model: torch.nn.Module, attention_layers: dict[str, Any]) -> int:
    """Wrap the forward of every decoder layer (a module whose ``self_attn.attn`` is a KV-cache layer)."""
    from vllm.model_executor.models.utils import extract_layer_index

    names = {id(m): name for name, m in attention_layers.items()}
    count = 0
    for module in model.modules():
        attn = getattr(getattr(module, "self_attn", None), "attn", None)
        name = names.get(id(attn)) if attn is not None else None
        if name is None:
            continue
        module.forward = functools.partial(_layer_forward, extract_layer_index(name), module.forward)
        count += 1
    if count == 0:
        raise RuntimeError("halluguard: scr found no decoder layers to hook")
    return count


def scr_trace(worker: Any, clear: bool = False) -> dict[str, dict[str, Any]]:
    """``LLM.collective_rpc(scr_trace)``: per real request id, its diagnostic map and selection.

    Each record: ``attn_map [Nv]``, ``grid (t, h, w)``, ``sources [K]`` (-1 padded), ``owner [Nv]`` and
    ``num_visual``. ``clear`` empties the log afterwards. Maps still on their way to the host are made
    into selections first.
    """
    runtime = worker.model_runner.__dict__.get("_halluguard_runtime")
    if runtime is not None and "scr" in runtime.ext:
        for req_id in list(runtime.ext["scr"].selections):
            selection_of(runtime, req_id)
    return worker_log(worker, LOG, clear)


class SCREngine(EngineMethod):
    """SCR: a hidden diagnostic pass picks the sources; the real prefill's early layers are edited."""

    name = "scr"
    needs_image = True
    tensor_parallel = True  # the diagnostic map is averaged across ranks
    pipeline_reason = "its diagnostic layers and its edit layers can sit on different pipeline stages"
    counters = ("scr_edits", "scr_split_images", "scr_unedited", "scr_early_exits")

    def check_inputs(self, cfg: Any, images: Any, prompt_len: int, vllm_config: Any) -> None:
        """Exactly one image followed by text, inside one prefill chunk (one pipeline stage: see
        :attr:`pipeline_reason`; eager: :meth:`check_settings`)."""
        if cfg.is_noop():
            return
        if len(images) != 1:
            raise ValueError(f"scr supports one image per request, got {len(images)}")
        span = images[0].mm_position
        if span.offset + span.length >= prompt_len:
            raise ValueError("scr needs text after the image (the diagnostic pass reads its attention)")
        sched = vllm_config.scheduler_config
        budget = sched.max_num_batched_tokens
        if span.length > budget:
            raise ValueError(
                f"scr keeps an image inside one prefill chunk, but the image has {span.length} tokens and "
                f"max_num_batched_tokens is {budget}"
            )
        cap = sched.long_prefill_token_threshold
        if 0 < cap < span.length:  # vLLM would never give the image's chunk room: it would wait forever
            raise ValueError(
                f"scr keeps an image inside one prefill chunk, but the image has {span.length} tokens and "
                f"long_prefill_token_threshold is {cap}"
            )

    def check_settings(self, cfg: Any, vllm_config: Any) -> None:
        """Eager execution: the edit is a forward hook, which a traced graph never calls."""
        if not cfg.is_noop() and int(vllm_config.compilation_config.mode) != 0:
            raise ValueError(
                "scr edits the residual stream with forward hooks and needs eager execution (--enforce-eager)"
            )

    def setup(self, runtime: Any) -> None:
        runtime.ext[self.name] = Worker(OrderedDict())

    init_state = staticmethod(init_state)
    apply = staticmethod(apply)

    def observes(self, row: Row, span: Any, backend: Any) -> bool:
        """Diagnostic rows (the attention map); the real request's edit is in the decoder layers."""
        return "scr_diag" in row.request.scratch

    def needs_attention(self, row: Row, span: Any) -> bool:
        """Diagnostic rows only: the real request's edit is a decoder-layer hook, outside attention."""
        return "scr_diag" in row.request.scratch

    def finished(self, runtime: Any, req_id: str) -> None:
        worker(runtime).selections.pop(req_id, None)  # kept across preemption: recompute reuses it

    def plan_step(
        self, runtime: Any, rows: list[Row], scheduler_output: Any, input_batch: Any, requests: Any
    ) -> None:
        w = worker(runtime)
        w.plan, w.skip_from = (), None
        if any("scr_edit" in row.request.scratch or "scr_diag" in row.request.scratch for row in rows):
            plan_step(runtime, scheduler_output, input_batch, requests)

    def install_model_hooks(self, runtime: Any, model: torch.nn.Module, attention_layers: Any) -> bool:
        w = worker(runtime)
        if w.hooked or not (w.plan or w.skip_from):
            return False
        install_layer_hooks(model, attention_layers)
        w.hooked = True
        return True
