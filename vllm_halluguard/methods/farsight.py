"""FarSight (arXiv 2505.16652, official code ``Shell/farsight_patch.py``): attention registers.

The official patch lets every causal row ``i`` of a length-``L`` sequence also put softmax mass on the
masked upper triangle, with purely positional logits ``-a_{h,i} * (j - i)`` for ``j > i``, and then drops that
mass, so rows sum to less than one. The slope is ``a_{h,i} = sigma * (1 - 0.25 * i / (L - 1)) + m_h``
(half a plain decay plus half a "progressive" decay, plus per-head ALiBi slopes ``m_h = 2^(-8(h+1)/H)``).

Because the register logits ignore content, a row's register mass is the closed form
``R = sum_{d=1..n} exp(-a d)`` with ``n = L - 1 - i`` future positions, and FarSight is exactly standard
attention rescaled per row: ``out = out_std * sigmoid(LSE - log R)`` (``R = 0`` leaves the row unchanged).

Modes (all share these functions):

* ``A``: official semantics, registers over the current length, every row recomputed at every step.
* ``B``: steady state; every row (prefill and decode) gets ``R_inf(h)`` with ``a_h = sigma * c + m_h``.
  This is an attention sink logit ``log R_inf(h)`` per head with a zero value vector.
* ``C``: prompt rows get the mode-A ``R`` for the prompt length; generated rows get none.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Self

import torch
from pydantic import Field, model_validator

from .base import LayerSpec, MethodConfig, ModelFamily, Refusal

#: Official default decay: ln 256 / ln 1024 = 0.8.
DEFAULT_SIGMA = math.log(256) / math.log(1024)

FarSightMode = Literal["A", "B", "C"]

#: The official code patches every layer of LLaVA-1.5-7B (32 layers); other models are not in the paper.
PAPER_DEPTHS: frozenset[tuple[ModelFamily, int]] = frozenset({("llava", 32)})


class FarSightConfig(MethodConfig):
    """FarSight hyperparameters (official-code defaults)."""

    name: ClassVar[str] = "farsight"
    #: Its sink scales the output after PruneHal and KVSmooth read the softmax without it: last.
    compose_rank: ClassVar[int] = 40
    composition_refusals: ClassVar[tuple[Refusal, ...]] = (
        Refusal(
            "mode",
            "A",
            None,
            "farsight mode 'A' recomputes the whole sequence without a KV cache at every step and "
            "composes with no other method; compose mode 'C' (default) or 'B'",
        ),
    )
    layer_fields: ClassVar[tuple[str, ...]] = ("layers",)
    preset_fields: ClassVar[tuple[str, ...]] = ("layers",)
    paper_fields: ClassVar[dict[tuple[ModelFamily, int], frozenset[str]]] = dict.fromkeys(
        PAPER_DEPTHS, frozenset(preset_fields)
    )

    mode: FarSightMode = Field(default="A", description="A: official recompute; B: sink; C: prompt rows")
    sigma: float = Field(default=DEFAULT_SIGMA, ge=0.0, description="register decay; inf disables")
    alibi: bool = Field(default=True, description="add per-head ALiBi slopes 2^(-8(h+1)/H)")
    progressive: bool = Field(default=True, description="row-progressive decay term (modes A and C)")
    progressive_c: float = Field(default=1.0, gt=0.0, le=1.0, description="mode B: a_h = sigma * c + m_h")
    layers: LayerSpec | None = Field(default=None, description="patched decoder layers; None = all")

    @model_validator(mode="after")
    def _decay_positive(self) -> Self:
        if self.sigma == 0.0 and not self.alibi:
            raise ValueError("sigma=0 without alibi gives registers that never decay (infinite mass)")
        return self

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        """Official code: every decoder layer, sigma = ln256/ln1024, ALiBi and progressive term on."""
        del model_family  # same setting for every family
        return cls(layers=tuple(range(num_layers)))

    def is_noop(self) -> bool:
        return math.isinf(self.sigma) or self.layers == ()

    @property
    def needs_recompute(self) -> bool:
        """Mode A changes every row at every step, so it cannot reuse a KV cache."""
        return self.mode == "A"


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head slopes ``m_h = 2^(-8 (h + 1) / H)``, fp32 ``[H]``."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.pow(2.0, -8.0 * (h + 1) / num_heads).float()


def _head_slopes(num_heads: int, alibi: bool, device: torch.device | str | None) -> torch.Tensor:
    if alibi:
        return alibi_slopes(num_heads, device)
    return torch.zeros(num_heads, device=device)


def register_slope(
    row: torch.Tensor,
    length: torch.Tensor,
    num_heads: int,
    sigma: float,
    alibi: bool = True,
    progressive: bool = True,
) -> torch.Tensor:
    """Mode-A register slope ``a[H, ...] = sigma * (1 - 0.25 * i / (L - 1)) + m_h``.

    ``row`` (``i``) and ``length`` (``L``) broadcast together (shape ``[...]``); ``L - 1`` is floored at 1 as
    in the official code. Without ``progressive`` the factor is 1.
    """
    row = row.double()
    length = length.double()
    if progressive:
        factor = 1.0 - 0.25 * row / torch.clamp(length - 1.0, min=1.0)
    else:
        factor = torch.ones_like(row + length)
    m = _head_slopes(num_heads, alibi, row.device).double()
    decay = torch.full_like(factor, math.inf) if math.isinf(sigma) else float(sigma) * factor
    return decay.unsqueeze(0) + m.reshape((num_heads,) + (1,) * factor.dim())


def log_register_mass(a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``log R`` with ``R = sum_{d=1..n} exp(-a d) = e^-a (1 - e^(-a n)) / (1 - e^-a)``; ``n = inf`` gives
    ``R_inf = e^-a / (1 - e^-a)``. Returns ``-inf`` where ``n <= 0`` or ``a = inf``. Computed in fp64.
    """
    a = a.double()
    if isinstance(n, torch.Tensor) and n.device == a.device:
        n = n.double()  # (no tensor made from host data: the engine's step plans count those)
    else:
        n = torch.as_tensor(n, device=a.device).double()
    a, n = torch.broadcast_tensors(a, n)
    live = (n > 0) & torch.isfinite(a)
    a_s = torch.where(live, a, torch.ones_like(a))
    n_s = torch.where(live, n, torch.ones_like(n))
    num = torch.where(torch.isinf(n_s), torch.zeros_like(a_s), torch.log(-torch.expm1(-a_s * n_s)))
    small = a_s < 1e-12
    den = torch.log(-torch.expm1(-a_s.clamp(min=1e-300)))
    # a -> 0 limit: R -> n (finite n only; validation forbids a = 0 with n = inf).
    out = torch.where(small, torch.log(n_s), -a_s + num - den)
    return torch.where(live, out, torch.full_like(out, -math.inf))


def register_mass(a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Closed-form register mass ``R`` (see :func:`log_register_mass`)."""
    return torch.exp(log_register_mass(a, n))


def sink_logits(
    num_heads: int,
    sigma: float,
    alibi: bool = True,
    progressive_c: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mode B: per-head sink logit ``log R_inf(h)`` with ``a_h = sigma * c + m_h``; fp32 ``[H]``."""
    m = _head_slopes(num_heads, alibi, device).double()
    a = m + (math.inf if math.isinf(sigma) else sigma * progressive_c)
    return log_register_mass(a, torch.full_like(a, math.inf)).float()


def row_log_r(
    row: torch.Tensor,
    length: torch.Tensor,
    num_heads: int,
    sigma: float,
    alibi: bool = True,
    progressive: bool = True,
) -> torch.Tensor:
    """Mode A (and mode C with ``length`` = prompt length): ``log R[H, ...]`` of row ``i`` among ``L``
    positions, ``n = L - 1 - i`` registers. Rows at or past the end get ``-inf`` (no registers).
    """
    a = register_slope(row, length, num_heads, sigma, alibi, progressive)
    n = (length.double() - 1.0 - row.double()).unsqueeze(0)
    return log_register_mass(a, n).float()


def rescale_factor(lse: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Kept softmax mass of a row: ``sigmoid(LSE - log R) = 1 / (1 + R e^-LSE)``; exactly 1 when ``R = 0``."""
    return torch.sigmoid(lse.float() - log_r.float())


def rescale(out: torch.Tensor, lse: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """FarSight from standard attention: ``out * sigmoid(LSE - log R)``.

    ``out[..., d]``, ``lse[...]`` and ``log_r`` broadcastable to ``lse``. Rows with ``log_r = -inf`` are
    returned unchanged (bit-exact).
    """
    factor = rescale_factor(lse, log_r)
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype)
