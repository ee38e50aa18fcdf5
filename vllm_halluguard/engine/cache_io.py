"""Reading and writing one layer's paged KV cache, whatever the native backend's layout.

* ``CPU_ATTN``: ``[num_blocks, Hkv, block_size, 2 * D]`` with each page half packed for its SIMD
  kernel (:mod:`vllm_halluguard.engine.cpu_cache` learns the packing; writes go through vLLM's op).
* ``FLASH_ATTN`` and ``TRITON_ATTN``: vLLM 0.32 hands their impls the same logical per-layer view
  ``[num_blocks, Hkv, block_size, 2 * D]`` (``kv_cache_interface.create_kv_cache_views``, whatever
  the physical layout), split by them as ``kv_cache.transpose(1, 2).split(D, -1)``. The plugin reads
  and writes it through the same K/V views ``[num_blocks, block_size, Hkv, D]`` (``"hnd2d"``, no copy).

:meth:`CacheIO.kernel_views` gives the project's Triton kernel the same ``[NB, BS, Hkv, D]`` views:
always for the split layouts, and for ``CPU_ATTN`` when its packing is a plain token- or dim-major
page (the ``vec`` ISA's fp32/bf16 pages), so the kernel can serve mitigated rows in CPU test mode.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_halluguard.engine import cpu_cache, tp
from vllm_halluguard.kernels import cpu_native, paged
from vllm_halluguard.kernels.layouts import Layout, split_kv

#: Native backends whose cache the plugin reads, by vLLM backend name.
SUPPORTED = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")
#: The split-K/V layouts (:mod:`vllm_halluguard.kernels.layouts`) of the GPU backends' per-layer views.
LAYOUTS: dict[str, Layout] = {"FLASH_ATTN": "hnd2d", "TRITON_ATTN": "hnd2d"}


#: ``StepPlan.prepared`` key: whether the native CPU kernels serve this step (:func:`native_views`): set by
#: the builder from ``Backend.cpu_native`` (the routes' decision), else found once per step.
NATIVE_KEY = "cpu_native"


class CacheIO:
    """One layer's cache with the callbacks :class:`~vllm_halluguard.engine.layer.LayerCall` takes."""

    def __init__(self, kv_cache: torch.Tensor, block_table: torch.Tensor) -> None:
        self.kv_cache = kv_cache
        self.block_table = block_table

    def gather(self, row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def gather_batch(self, rows: list[int], seq_lens: list[int], values: bool = True) -> tuple:
        raise NotImplementedError

    def gather_slots(self, rows: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``positions [B, P]`` (on the cache's device) of batch ``rows`` (a list, or a device
        index tensor: then no host data is read)."""
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        """Tokens per cache block."""
        raise NotImplementedError

    def read_at(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[..., Hkv, D]`` at cache ``blocks`` and in-block ``offsets`` (same shape, on the
        cache's device: a step's precomputed addresses, so a layer reads no host data)."""
        raise NotImplementedError

    def read_keys(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        """K ``[B, s_max, Hkv, D]`` of the blocks ``ids [B, n_blocks]``
        (:func:`~vllm_halluguard.engine.cpu_cache.page_ids`, built once per step); positions past a
        row's length are not zeroed (mask them)."""
        raise NotImplementedError

    def read_values(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        """V ``[B, s_max, Hkv, D]`` of the blocks ``ids``, as :meth:`read_keys`."""
        raise NotImplementedError

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def kernel_views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K and V views ``[NB, BS, Hkv, D]`` for the Triton kernel, or ``None`` if the layout has none."""
        return None


class CPUPages(CacheIO):
    """vLLM's packed CPU pages (``layer.isa`` names the packing)."""

    def __init__(
        self, kv_cache: torch.Tensor, block_table: torch.Tensor, isa: str, kv_cache_dtype: str
    ) -> None:
        super().__init__(kv_cache, block_table)
        _, _, bs, two_hs = kv_cache.shape
        self.isa, self.kv_cache_dtype = isa, kv_cache_dtype
        self.layout = cpu_cache.learn_layout(isa, kv_cache.dtype, bs, two_hs // 2)
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views_made = False

    def gather(self, row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_cache.gather_kv(self.kv_cache, self.block_table[row], seq_len, self.layout)

    def gather_batch(self, rows: list[int], seq_lens: list[int], values: bool = True) -> tuple:
        return cpu_cache.gather_kv_batched(
            self.kv_cache, self.block_table, rows, seq_lens, self.layout, values
        )

    def gather_slots(self, rows: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_cache.gather_slots(self.kv_cache, self.block_table, rows, positions, self.layout)

    @property
    def block_size(self) -> int:
        return int(self.kv_cache.shape[2])

    def read_at(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.kernel_views()  # plain page halves: two index ops on strided views
        if views is not None:
            return views[0][blocks, offsets], views[1][blocks, offsets]
        return cpu_cache.read_at(self.kv_cache, blocks, offsets, self.layout)

    def read_keys(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        views = self.kernel_views()
        if views is not None:
            return views[0][ids].flatten(1, 2)[:, :s_max]
        return cpu_cache.read_pages(self.kv_cache, ids, s_max, self.layout, 1)[0]

    def read_values(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        views = self.kernel_views()
        if views is not None:
            return views[1][ids].flatten(1, 2)[:, :s_max]
        return cpu_cache.read_pages(self.kv_cache, ids, s_max, self.layout, 2)[1]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cpu_cache.write_kv(self.kv_cache, k, v, slots, self.isa, self.kv_cache_dtype)

    def kernel_views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._views_made:  # made once per layer call
            self._views, self._views_made = cpu_kernel_views(self.kv_cache, self.layout), True
        return self._views


def cpu_kernel_views(
    kv_cache: torch.Tensor, layout: cpu_cache.PageLayout
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Strided ``[NB, BS, Hkv, D]`` views of a packed CPU cache whose page halves are plain."""
    nb, hkv, bs, two_hs = kv_cache.shape
    hs = two_hs // 2
    if not kv_cache.is_contiguous():
        return None
    stride_block, stride_head = kv_cache.stride(0), kv_cache.stride(1)
    views = []
    for half, order in ((0, layout.k_order), (1, layout.v_order)):
        if order == "token":
            strides = (stride_block, hs, stride_head, 1)
        elif order == "dim":
            strides = (stride_block, 1, stride_head, bs)
        else:
            return None
        offset = kv_cache.storage_offset() + half * bs * hs
        views.append(kv_cache.as_strided((nb, bs, hkv, hs), strides, offset))
    return views[0], views[1]


class SplitViews(CacheIO):
    """A cache seen as K and V views ``[NB, BS, Hkv, D]`` (FlashAttention and vLLM Triton layouts)."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor) -> None:
        super().__init__(k_cache, block_table)
        self.k_cache, self.v_cache = k_cache, v_cache

    def gather(self, row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return paged.gather_kv(self.k_cache, self.v_cache, self.block_table[row], seq_len)

    def gather_batch(self, rows: list[int], seq_lens: list[int], values: bool = True) -> tuple:
        bs = self.k_cache.shape[1]
        device = self.k_cache.device
        lens = torch.tensor(seq_lens, device=device)
        s_max = max(seq_lens)
        n_blocks = -(-s_max // bs)
        ids = self.block_table[rows, :n_blocks].long()
        used = torch.arange(n_blocks, device=device)[None, :] * bs < lens[:, None]
        ids = torch.where(used, ids, ids[:, :1])
        valid = torch.arange(s_max, device=device)[None, :] < lens[:, None]
        out = []
        for cache in (self.k_cache, self.v_cache) if values else (self.k_cache,):
            x = cache[ids].flatten(1, 2)[:, :s_max]  # [B, S_max, Hkv, D]
            out.append(x.masked_fill(~valid[:, :, None, None], 0))
        return out[0], out[1] if values else None, valid

    def gather_slots(self, rows: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.k_cache.shape[1]
        if positions.device != self.k_cache.device:  # host positions (the torch path's)
            positions = positions.to(self.k_cache.device)
        blocks = self.block_table[rows].long().gather(1, positions // bs)
        offsets = positions % bs
        return self.k_cache[blocks, offsets], self.v_cache[blocks, offsets]

    @property
    def block_size(self) -> int:
        return int(self.k_cache.shape[1])

    def read_at(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[blocks, offsets], self.v_cache[blocks, offsets]

    def read_keys(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        return self.k_cache[ids].flatten(1, 2)[:, :s_max]

    def read_values(self, ids: torch.Tensor, s_max: int) -> torch.Tensor:
        return self.v_cache[ids].flatten(1, 2)[:, :s_max]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store at real token slots (``>= 0``: the methods write their rows' tokens, never vLLM's padding),
        without a boolean mask, so nothing waits for the device."""
        bs = self.k_cache.shape[1]
        slots = slots.long()
        blocks, offsets = slots // bs, slots % bs
        self.k_cache[blocks, offsets] = k.to(self.k_cache.dtype)
        self.v_cache[blocks, offsets] = v.to(self.v_cache.dtype)

    def kernel_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache, self.v_cache


def cache_io(
    backend_name: str, kv_cache: torch.Tensor, block_table: torch.Tensor, layer: Any, impl: Any
) -> CacheIO:
    """The :class:`CacheIO` of a native backend's per-layer cache tensor."""
    if backend_name == "CPU_ATTN":
        return CPUPages(kv_cache, block_table, layer.isa, impl.kv_cache_dtype)
    if backend_name in LAYOUTS:
        return SplitViews(*split_kv(kv_cache, LAYOUTS[backend_name]), block_table)
    raise NotImplementedError(
        f"halluguard reads the KV cache of {', '.join(SUPPORTED)} only, not {backend_name}"
    )


def native_serves(cache_dtype: str = "auto") -> bool:
    """Whether the native CPU kernels serve this worker's layers: enabled and built, one tensor-parallel
    rank (the statistics over every rank's heads are all-reduced by the torch ops) and a cache in the
    model's dtype (``cache_dtype`` ``auto``: not fp8)."""
    return (
        cache_dtype == "auto"
        and cpu_native.enabled()
        and tp.tp_group().world_size == 1
        and cpu_native.module() is not None
    )


def native_views(call: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The K and V views of a layer call's cache where the native CPU kernels
    (:mod:`~vllm_halluguard.kernels.cpu_native`) serve it: a CPU cache with plain views in the query's
    dtype, one tensor-parallel rank, and the kernels enabled and built; else ``None`` (torch ops serve)."""
    io = call.io
    if io is None or call.query.device.type != "cpu":
        return None
    prepared = getattr(call.plan, "prepared", None)
    usable = None if prepared is None else prepared.get(NATIVE_KEY)
    if usable is None:  # a plan not made by the builder (the step tests): once per step
        usable = native_serves()
        if prepared is not None:
            prepared[NATIVE_KEY] = usable
    if not usable:
        return None
    views = io.kernel_views()
    if views is None or views[0].dtype != call.query.dtype or getattr(io, "kv_cache_dtype", "auto") != "auto":
        return None
    return views
