"""Tensor parallelism in the engine: statistics over all query heads, and each rank's slice of heads.

Under tensor parallelism every worker holds a contiguous slice of the query heads (vLLM splits them
evenly: rank ``r`` of ``R`` holds heads ``r * H/R .. (r+1) * H/R - 1``) and computes attention for
those only. A method decision that reads a statistic over heads (KVSmooth's entropy, PruneHal's visual
attention, SCR's map) therefore sums its per-head values on each rank, all-reduces the sums across the
tensor-parallel group and divides by the total head count, so every rank decides the same thing, and
the same as one worker holding every head. Per-head constants (FarSight's ALiBi slopes) are computed
for all heads and sliced to the rank's own (:func:`head_slice`).

Every rank runs the same batch through the same layers, so the collectives line up: a caller may only
branch on what every rank sees alike (the scheduled batch, request state, reduced statistics).
With one rank nothing is communicated and the statistic is computed exactly as before (``x.mean``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Group(Protocol):
    """What the reduction needs of a process group (vLLM's ``GroupCoordinator`` has it)."""

    world_size: int
    rank_in_group: int
    device: torch.device  # where its collectives take tensors (vLLM: the worker's GPU, or the CPU)

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor: ...


class _Single:
    """The group of a process that is not part of a tensor-parallel group (tests, the reference)."""

    world_size = 1
    rank_in_group = 0
    device = torch.device("cpu")

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        return input_


_SINGLE = _Single()
_parallel_state: Any = None


def tp_group() -> Group:
    """vLLM's tensor-parallel group of this worker (a one-rank group where vLLM set up none)."""
    global _parallel_state
    if _parallel_state is None:  # imported on first use: the reference and unit tests need no vLLM
        from vllm.distributed import parallel_state

        _parallel_state = parallel_state
    group = _parallel_state._TP
    return _SINGLE if group is None else group


def head_mean(x: torch.Tensor, dim: int, group: Group | None = None) -> torch.Tensor:
    """Mean over the query heads at ``dim`` of ``x``, whose local heads are this rank's slice.

    One rank: ``x.mean(dim)``. Several: the per-rank sums (fp32) all-reduced, divided by the total
    head count. Every rank of ``group`` must call it, in the same order, with the same shape.
    """
    group = group or tp_group()
    if group.world_size == 1:
        return x.mean(dim)
    total = x.shape[dim] * group.world_size
    summed = group.all_reduce(_on_group_device(x.float().sum(dim).contiguous(), group))
    return summed / total


def rank_mean(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """Mean across the ranks of ``x`` (each rank's mean over its own, equally many, heads)."""
    group = group or tp_group()
    if group.world_size == 1:
        return x
    return group.all_reduce(_on_group_device(x.clone(), group)) / group.world_size


def _on_group_device(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``x`` if it lives where the group's collectives run. On CUDA vLLM's all-reduce is a custom op
    registered for the CUDA dispatch key only: a host tensor would fail deep in the dispatcher, so a
    statistic moved to the host before its reduction is a bug, reported here by name."""
    if x.device.type != group.device.type:
        raise RuntimeError(
            f"halluguard: a tensor-parallel statistic on {x.device} reached the all-reduce of a group on "
            f"{group.device}; reduce on the layer's device and move to the host afterwards"
        )
    return x


def head_slice(num_local: int, group: Group | None = None) -> tuple[int, slice]:
    """``(total heads, this rank's slice of them)`` for a rank holding ``num_local`` query heads."""
    group = group or tp_group()
    start = group.rank_in_group * num_local
    return num_local * group.world_size, slice(start, start + num_local)
