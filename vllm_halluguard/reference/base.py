"""Hook mechanics shared by every dense reference method (HF transformers, eager attention).

A :class:`ReferenceMethod` attached to a model (``with method(model): model.generate(...)``):

* switches the text model's attention to ``"halluguard_eager"``, a registered copy of HF's eager attention
  (same ops in the same order, so an inactive method is bit-identical to eager) that calls the method's
  :meth:`~ReferenceMethod.key_mask` before the softmax and :meth:`~ReferenceMethod.post_attention` after it;
* hooks the top-level forward to detect the phase (a forward on an empty cache is a prefill and starts a
  new batch of requests; the others are decode steps), the left padding and the image-token positions;
* hooks each attention module (:meth:`~ReferenceMethod.after_attention`, with the KV cache) and each decoder
  layer (:meth:`~ReferenceMethod.layer_output`, the residual stream).

Everything is undone on exit, even on error. Batches must be left-padded (HF's convention for generation).
Per-request state is kept as ``[B, ...]`` tensors created at prefill. Beam search (cache reordering) is
not supported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..methods.base import MethodConfig
from ..methods.compose import members_of
from ..methods.resolve import NOT_APPLICABLE
from .adapters import ModelAdapter, visual_positions

logger = logging.getLogger(__name__)

ATTN_IMPL = "halluguard_eager"
_METHOD_ATTR = "_halluguard_method"

Phase = Literal["prefill", "decode", "diagnostic"]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, d] -> [B, Hkv * n_rep, T, d]`` exactly like HF's ``repeat_kv``."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def halluguard_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF eager attention with two method hooks; identical to eager when the hooks change nothing."""
    method: ReferenceMethod | None = getattr(module, _METHOD_ATTR, None)
    key_states = _repeat_kv(key, module.num_key_value_groups)
    value_states = _repeat_kv(value, module.num_key_value_groups)
    logits = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    layer = module.layer_idx
    if method is not None:
        drop = method.key_mask(layer)
        if drop is not None:
            logits = logits.masked_fill(drop[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value_states)
    if method is not None:
        out, probs = method.post_attention(layer, query, key_states, logits, probs, out)
    return out.transpose(1, 2).contiguous(), probs


_registered = False


def register_attention() -> None:
    """Register ``"halluguard_eager"`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPL, halluguard_attention)
        AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
        _registered = True


class _StopForward(Exception):
    """Raised by a layer hook to end the diagnostic forward early."""


@dataclass
class ForwardInfo:
    """What the hooks know about the running forward.

    ``positions[B, past + q]``: index of each cached/new token among the real (unpadded) tokens, ``-1`` on
    padding. ``lengths[B]``: real tokens in the sequence after this forward. ``step``: decode step (1 for the
    forward consuming the first generated token; 0 in prefill).
    """

    phase: Phase
    batch_size: int
    past_len: int
    q_len: int
    positions: torch.Tensor
    lengths: torch.Tensor
    step: int

    @property
    def query_positions(self) -> torch.Tensor:
        """``[B, q]`` real-token index of each query row (``-1`` on padding)."""
        return self.positions[:, self.past_len :]


@dataclass
class RequestInfo:
    """Per-batch facts fixed at prefill."""

    batch_size: int
    prompt_len: int
    prompt_lengths: torch.Tensor
    visual_idx: torch.Tensor | None
    model_kwargs: dict[str, Any] = field(repr=False, default_factory=dict)


class ReferenceMethod:
    """Base class of the dense reference methods; subclasses override the hook methods they need.

    Use as ``with method(model): model.generate(...)``. ``self.config`` is the config resolved for the
    attached model (presets filled, layers checked); ``self.trace`` collects per-step records for tests.
    """

    config_cls: ClassVar[type[MethodConfig]]
    #: The method needs the image-token positions (raises if a prefill has no image).
    needs_visual: ClassVar[bool] = False
    #: The method only acts on decode steps that reuse the KV cache.
    needs_cache: ClassVar[bool] = False
    #: The method acts in its own diagnostic forward (SCR); in a composition only such members do.
    has_diagnostic: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config)}")
        self.user_config = config
        self.config = config
        self.adapter: ModelAdapter | None = None
        self.request: RequestInfo | None = None
        self.fwd: ForwardInfo | None = None
        self.trace: list[dict[str, Any]] = []
        self._step = 0
        self._in_diagnostic = False
        self._warned_no_cache = False
        #: The attached method whose hooks see the forwards (a composition's, for its members).
        self._host: ReferenceMethod = self

    # ------------------------------------------------------------------ hooks for subclasses

    def reset(self, request: RequestInfo) -> None:
        """A prefill started a new batch of requests: (re)create per-request state."""

    def on_prefill(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called before the prefill forward runs (after :meth:`reset`); SCR runs its diagnostic here."""

    def key_mask(self, layer: int) -> torch.Tensor | None:
        """Bool ``[B, kv_len]`` of keys to remove from ``layer``'s softmax (``-inf`` logits), or ``None``."""
        return None

    def post_attention(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After the softmax: ``query[B,H,q,d]``, ``key[B,H,T,d]`` (GQA-expanded), ``logits``/``probs``
        ``[B,H,q,T]``, ``out[B,H,q,d]``. Returns the (possibly changed) ``out`` and ``probs``.
        """
        return out, probs

    def after_attention(self, layer: int, cache: Any) -> None:
        """After ``layer``'s attention module returned; ``cache`` is the ``DynamicCache`` (or ``None``)."""

    def layer_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Residual stream after decoder layer ``layer`` ``[B, q, D]``; return a replacement or ``None``."""
        return None

    def after_forward(self) -> None:
        """After the whole forward (prefill or decode step)."""

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def phase(self) -> Phase | None:
        return None if self.fwd is None else self.fwd.phase

    @property
    def forward_info(self) -> ForwardInfo:
        """The running forward (the hooks that call subclasses run only inside one)."""
        if self.fwd is None:
            raise RuntimeError(f"{type(self).__name__}: no forward is running")
        return self.fwd

    @property
    def attached(self) -> ModelAdapter:
        """The adapter of the attached model (set by ``with method(model)``)."""
        if self.adapter is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model")
        return self.adapter

    def run_diagnostic(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run a cache-free copy of the prefill forward with ``phase == "diagnostic"``.

        :meth:`layer_output` may raise :meth:`stop_forward` to end it early.
        """
        host = self._host
        diag_kwargs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        diag_kwargs["use_cache"] = False
        saved = host.fwd
        assert saved is not None
        host.set_forward(
            ForwardInfo("diagnostic", saved.batch_size, 0, saved.q_len, saved.positions, saved.lengths, 0)
        )
        host._in_diagnostic = True
        try:
            with torch.no_grad():
                model(*args, **diag_kwargs)
        except _StopForward:
            pass
        finally:
            host._in_diagnostic = False
            host.set_forward(saved)

    def set_forward(self, fwd: ForwardInfo | None) -> None:
        """The running forward's :class:`ForwardInfo` (a composition passes it to its members)."""
        self.fwd = fwd

    @staticmethod
    def stop_forward() -> None:
        """End the running (diagnostic) forward."""
        raise _StopForward()

    # ------------------------------------------------------------------ mechanics

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[ReferenceMethod]:
        self._attach(model)
        try:
            yield self
        finally:
            self._detach()

    def _attach(self, model: nn.Module) -> None:
        if self.adapter is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to a model")
        adapter = ModelAdapter.from_model(model)
        for layer in adapter.layers:
            if getattr(layer.self_attn, _METHOD_ATTR, None) is not None:
                raise RuntimeError("another halluguard reference method is already attached to this model")
        for member in members_of(self.user_config):
            refusal = NOT_APPLICABLE.get((member.name, adapter.family))
            if refusal is not None:  # the engine refuses it too (methods.resolve)
                raise ValueError(refusal)
        self.config = self.user_config.for_model(adapter.family, adapter.num_layers)
        register_attention()
        self.adapter = adapter
        self._handles: list[Any] = []
        self._saved_impl = adapter.text_config._attn_implementation_internal
        self._saved_generate = model.__dict__.get("generate")
        try:
            adapter.text_config._attn_implementation_internal = ATTN_IMPL
            for idx, layer in enumerate(adapter.layers):
                setattr(layer.self_attn, _METHOD_ATTR, self)
                self._handles.append(
                    layer.self_attn.register_forward_hook(self._attn_hook(idx), with_kwargs=True)
                )
                self._handles.append(layer.register_forward_hook(self._layer_hook(idx)))
            self._handles.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_post_hook))
            self._wrap_generate(model)
        except BaseException:
            self._detach()
            raise
        logger.debug("attached %s to %s", self.config.canonical(), type(model).__name__)

    def _detach(self) -> None:
        adapter = self.adapter
        if adapter is None:
            return
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        for layer in adapter.layers:
            if getattr(layer.self_attn, _METHOD_ATTR, None) is self:
                delattr(layer.self_attn, _METHOD_ATTR)
        adapter.text_config._attn_implementation_internal = self._saved_impl
        if "generate" in adapter.model.__dict__:
            del adapter.model.__dict__["generate"]
        if self._saved_generate is not None:
            adapter.model.__dict__["generate"] = self._saved_generate
        self.adapter = None
        self.request = None
        self.fwd = None

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Check or adjust the keyword arguments of ``model.generate`` while attached.

        Methods with per-request decode state (``needs_cache``) refuse beam search: the cache reorders
        beams but the method state would not follow.
        """
        if not self.needs_cache:
            return
        gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1
        if beams > 1:
            raise NotImplementedError(f"the {self.config.name} reference does not support beam search")

    def _wrap_generate(self, model: nn.Module) -> None:
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            self.prepare_generate(model, kwargs)
            return original(*args, **kwargs)

        model.__dict__["generate"] = generate

    def _attn_hook(self, idx: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if self.fwd is not None:
                self.after_attention(idx, kwargs.get("past_key_values"))

        return hook

    def _layer_hook(self, idx: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.fwd is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            new = self.layer_output(idx, hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _model_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._in_diagnostic:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            raise ValueError("forward without input_ids or inputs_embeds")
        b, q = ref.shape[0], ref.shape[1]
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, past + q, dtype=torch.bool, device=ref.device)
        elif not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("the reference needs a 2-D attention_mask (or none)")
        mask = mask.bool()
        if mask.shape != (b, past + q):
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} does not cover {past} cached + {q} new tokens"
            )
        positions = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
        lengths = mask.sum(-1)
        if past == 0:
            if not bool(mask[:, -1].all()):
                raise ValueError("right-padded batch: the reference needs left padding (padding_side='left')")
            if kwargs.get("use_cache") is False and self.needs_cache and not self._warned_no_cache:
                logger.warning(
                    "%s acts on cached decode steps; use_cache=False disables it", self.config.name
                )
                self._warned_no_cache = True
            vis = None
            if input_ids is not None:
                vis = visual_positions(input_ids, self.attached.image_token_id)
            if vis is None and self.needs_visual:
                raise ValueError(f"{self.config.name} needs image tokens in the prompt (pass input_ids)")
            self._step = 0
            self.request = RequestInfo(b, q, lengths, vis, dict(kwargs))
            self.set_forward(ForwardInfo("prefill", b, 0, q, positions, lengths, 0))
            self.reset(self.request)
            self.on_prefill(module, args, kwargs)
        else:
            if self.request is None or self.request.batch_size != b:
                raise RuntimeError("decode forward that does not continue the prefill seen by this method")
            if q != 1:
                raise ValueError(f"decode forwards must add one token per row, got {q}")
            self._step += 1
            self.set_forward(ForwardInfo("decode", b, past, q, positions, lengths, self._step))
        return None

    def _model_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._in_diagnostic or self.fwd is None:
            return None
        self.after_forward()
        return None
