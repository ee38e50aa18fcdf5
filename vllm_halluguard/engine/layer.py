"""What a method sees of one attention layer call, independent of the backend that made it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_halluguard.engine.state import Row


@dataclass
class LayerCall:
    """One decoder layer's attention call in one engine step (flat varlen batch).

        ``gather(row, seq_len)`` returns that row's K and V ``[seq_len, Hkv, D]`` from the paged cache;
        ``write(slots, k, v)`` stores K/V rows ``[n, Hkv, D]`` at cache slots ``[n]``.
        ``gather_batch(rows, seq_lens, values=True)`` (backends that have one) returns the K/V of several
        rows at once, padded: ``k, v [B, S_max, Hkv, D]`` (``v`` is ``None`` for ``values=False``) and
        ``valid [B, S_max]``; without it methods go row by row. ``gather_slots(rows, positions [B, P])``
        (with ``gather_batch``) returns K and V ``[B, P, Hkv, D]`` at a few positions per row (``rows``: a
    list or a device index tensor).
    """

    layer: int
    scale: float
    query: torch.Tensor  # [T, Hq, D]
    output: torch.Tensor  # [T, Hq, D]: the native kernel's rows are filled, reworked rows are not
    query_start_loc: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor  # [T]
    runtime: Any  # the worker's :class:`~vllm_halluguard.engine.runtime.Runtime`
    gather: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    gather_batch: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None
    gather_slots: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: The step's :class:`~vllm_halluguard.engine.plan.StepPlan` (its per-row device tables on the
    #: kernel path), when the call comes from one.
    plan: Any = None
    #: The layer's :class:`~vllm_halluguard.engine.cache_io.CacheIO` (reads at a step's precomputed
    #: addresses: ``read_at``, ``read_keys``), when the call comes from a plan.
    io: Any = None

    @classmethod
    def reading(cls, io: Any, **fields: Any) -> LayerCall:
        """A call whose cache callbacks are those of ``io`` (a
        :class:`~vllm_halluguard.engine.cache_io.CacheIO`), which it also carries (``fields``: the rest)."""
        return cls(
            gather=io.gather, write=io.write, gather_batch=io.gather_batch, gather_slots=io.gather_slots,
            io=io, **fields,
        )  # fmt: skip

    def span(self, row: Row) -> tuple[int, int, int]:
        """``(first token, end token, seq_len)`` of a row in the flat batch."""
        i = row.index
        return self.query_start_loc[i], self.query_start_loc[i + 1], self.seq_lens[i]

    def positions(self, row: Row) -> torch.Tensor:
        start, end, seq_len = self.span(row)
        return torch.arange(seq_len - (end - start), seq_len)

    def is_single(self, row: Row) -> bool:
        """Whether the row has exactly one query token this step (a decode row, or a 1-token chunk)."""
        i = row.index
        return self.query_start_loc[i + 1] - self.query_start_loc[i] == 1
