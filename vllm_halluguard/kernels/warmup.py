"""Every specialisation of the Triton kernel that the engine can launch, compiled before serving.

Triton compiles :mod:`.triton_attention`'s kernels once per specialisation (:func:`launch_key`) and
caches the binary in the process (and on disk). For one layer's cache and head count, the engine's
launches (``engine/execute.py``: the full pass with ``out``, ``lse`` and ``entropy``) differ only in

* the tiles: decode (``T <= B``) or prefill (the launch heuristic; fp32 uses one configuration);
* ``HAS_SINKS`` and ``HAS_MASK`` (a masked launch also skips fully masked tiles);
* ``SPLIT_KV``: whether the split count is above 1 (only with SMs to fill: never on CPU); the merge
  launch that follows differs only in ``HAS_SINKS``;
* the query's layout: the engine passes rows of vLLM's query, a view of the fused QKV projection or a
  contiguous tensor (a row slice keeps the strides, an index copy is contiguous).

Batch size, split count, sequence and mask lengths are runtime values, not part of the key (the
kernel's ``do_not_specialize`` lists). :func:`launch_variants` launches one tiny batch per case;
inside :func:`~.triton_attention.record_launches` ``("compile")`` this compiles each specialisation
without running it, and ``("record")`` only lists them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from vllm_halluguard.kernels.triton_attention import paged_attention_into

#: Query layouts the engine may pass (see the module docstring).
Q_LAYOUTS = ("fused", "contiguous")


@dataclass(frozen=True)
class Variant:
    """One case of the flags that select a specialisation."""

    prefill: bool
    sinks: bool
    mask: bool
    split: bool


def variants(split_kv: bool) -> list[Variant]:
    """Every flag case; ``split_kv=False`` where the split count is always 1 (no SMs: CPU)."""
    splits = (False, True) if split_kv else (False,)
    return [
        Variant(*flags) for flags in itertools.product((False, True), (False, True), (False, True), splits)
    ]


def query(layout: str, tokens: int, num_heads: int, k_cache: torch.Tensor) -> torch.Tensor:
    """A ``[tokens, num_heads, D]`` query in ``layout`` on the cache's device and dtype."""
    _, _, hkv, d = k_cache.shape
    if layout == "fused":
        qkv = torch.empty(tokens, num_heads + 2 * hkv, d, dtype=k_cache.dtype, device=k_cache.device)
        return qkv[:, :num_heads]
    if layout == "contiguous":
        return torch.empty(tokens, num_heads, d, dtype=k_cache.dtype, device=k_cache.device)
    raise ValueError(f"unknown query layout {layout!r}; expected one of {Q_LAYOUTS}")


def launch_variant(
    variant: Variant, q_layout: str, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """One tiny launch of ``variant``: one sequence of 1 (decode) or 2 (prefill) tokens on block 0,
    laid out as the engine lays out a reworked sub-batch. Reads at most two keys of block 0."""
    tokens = 2 if variant.prefill else 1
    device = k_cache.device
    q = query(q_layout, tokens, num_heads, k_cache)
    out = torch.empty_like(q)
    lse = torch.empty(tokens, num_heads, dtype=torch.float32, device=device)
    entropy = torch.empty_like(lse)
    ints = {"dtype": torch.int32, "device": device}
    sinks = torch.full((tokens, num_heads), float("-inf"), device=device) if variant.sinks else None
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device) if variant.mask else None
    starts, lens = torch.tensor([0, tokens], **ints), torch.tensor([tokens], **ints)
    table = torch.zeros(1, 1, **ints)
    paged_attention_into(
        out, lse, entropy, q, k_cache, v_cache, starts, lens, table, 1.0, sinks, mask,
        num_splits=2 if variant.split else 1,
    )  # fmt: skip


def launch_variants(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, split_kv: bool) -> None:
    """:func:`launch_variant` for every variant and query layout of one layer's geometry."""
    for q_layout in Q_LAYOUTS:
        for variant in variants(split_kv):
            launch_variant(variant, q_layout, num_heads, k_cache, v_cache)
