"""A simulated accelerator for CPU tests: device discipline without a GPU.

On a CPU-only machine "the device" and "the host" are the same, so a host tensor handed to a GPU-only
op (vLLM's ``torch.ops.vllm.all_reduce`` is registered for the CUDA dispatch key only) looks exactly like
a device tensor, and a test cannot see the mistake. Here device tensors are CPU tensors of the subclass
:class:`OnDevice`, which report ``SIM_DEVICE`` (``cuda:0``) as their device and follow CUDA's rules:

* an op mixing an :class:`OnDevice` tensor with a host tensor of one or more dimensions raises
  :class:`DeviceDisciplineError` (CUDA's "Expected all tensors to be on the same device"); host 0-dim
  tensors pass as scalars, host index tensors may index a device tensor, and ``copy_`` / ``__setitem__``
  may cross (they copy);
* ``.cpu()``, ``.to("cpu")`` and ``.numpy()`` return plain host tensors (copies), and are recorded with
  ``.item()``, ``.tolist()`` and ``bool()`` as device-to-host transfers (per thread, yielded by
  :func:`simulated_device`);
* inside :func:`simulated_device`, factories given ``device=SIM_DEVICE`` and ``.to(SIM_DEVICE)`` /
  ``.cuda()`` of host tensors make :class:`OnDevice` tensors.

:func:`require_device` is what a GPU-only op does with a host tensor: the test process groups call it in
their ``all_reduce``, so a statistic moved to the host before its tensor-parallel reduction fails here as
it fails on CUDA.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SIM_DEVICE = torch.device("cuda", 0)

_local = threading.local()


def _transfers() -> list[tuple[str, str]]:
    """``(what, where)`` of this thread's device-to-host transfers since its :func:`simulated_device`."""
    if not hasattr(_local, "transfers"):
        _local.transfers = []
    return _local.transfers


class DeviceDisciplineError(RuntimeError):
    """A host tensor met a device tensor where CUDA would refuse it."""


_Tensor = torch.Tensor
_TO_HOST = {_Tensor.cpu, _Tensor.numpy}
_SYNCS = {_Tensor.item, _Tensor.tolist, _Tensor.__bool__, _Tensor.__int__, _Tensor.__float__}
_DEVICE_GET = _Tensor.device.__get__  # type: ignore[attr-defined]
_IS_CUDA_GET = _Tensor.is_cuda.__get__  # type: ignore[attr-defined]
_CROSSING = {_Tensor.copy_, _Tensor.__setitem__}  # copies: either side may be on either device


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _is_host(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _is_sim(device: Any) -> bool:
    return device is not None and torch.device(device).type == SIM_DEVICE.type


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "device_sim" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _plain(x: Any) -> Any:
    return x.as_subclass(torch.Tensor) if isinstance(x, OnDevice) else x


def _to_target(args: tuple, kwargs: dict) -> Any:
    """The device a ``Tensor.to`` call moves to (``None``: dtype only)."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:2]:
        if isinstance(a, (torch.device, str, int)):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _strip_device(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    if len(args) > 1 and isinstance(args[1], (torch.device, str, int)):
        args = args[:1] + args[2:]
    elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): its dtype, no device
        kwargs["dtype"] = args[1].dtype
        args = args[:1] + args[2:]
    return args, kwargs


def on_device(x: torch.Tensor) -> OnDevice:
    """``x`` (a host tensor) as a tensor on the simulated device (shares its storage)."""
    return torch.Tensor._make_subclass(OnDevice, _plain(x), x.requires_grad)


def require_device(x: torch.Tensor, what: str) -> None:
    """What a GPU-only op does with a host tensor: refuse it."""
    if not isinstance(x, OnDevice):
        raise DeviceDisciplineError(
            f"{what} got a host tensor {tuple(x.shape)}: the op runs on the device only"
        )


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the accelerator (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return SIM_DEVICE
        if func == _IS_CUDA_GET:
            return True
        if func in _TO_HOST or (func is _Tensor.to and _is_host(_to_target(args, kwargs))):
            _transfers().append((getattr(func, "__name__", str(func)), _where()))
            with torch._C.DisableTorchFunctionSubclass():
                if func is _Tensor.numpy:
                    return args[0].numpy().copy()
                rest, kw = _strip_device(args, kwargs) if func is _Tensor.to else (args, {})
                if func is _Tensor.to:
                    return _plain(_Tensor.to(*rest, **kw)).clone()
                return _plain(args[0]).clone()
        if func is _Tensor.to or func is _Tensor.cuda:  # already on the device: dtype changes only
            rest, kw = _strip_device(args, kwargs) if func is _Tensor.to else (args[:1], {})
            kw.pop("non_blocking", None)
            return super().__torch_function__(_Tensor.to, types, rest, kw)
        if func in _SYNCS:
            _transfers().append((func.__name__, _where()))
        elif func not in _CROSSING:
            _check_same_device(func, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _check_same_device(func: Any, args: tuple, kwargs: dict) -> None:
    tensors = list(_tensors(args)) + list(_tensors(kwargs))
    if not any(isinstance(t, OnDevice) for t in tensors):
        return
    if func is _Tensor.__getitem__:  # host index tensors may index a device tensor, not the reverse
        if isinstance(args[0], OnDevice):
            return
        host = [args[0]]
    else:
        host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
    if host:
        name = getattr(func, "__name__", str(func))
        raise DeviceDisciplineError(
            f"{name} mixes device tensors with host tensor(s) {[tuple(t.shape) for t in host]} at {_where()}"
        )


class _SimMode(TorchFunctionMode):
    """Factories with ``device=SIM_DEVICE`` and moves of host tensors to it make :class:`OnDevice`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _Tensor.to or func is _Tensor.cuda:
            self_ = args[0]
            target = SIM_DEVICE if func is _Tensor.cuda else _to_target(args, kwargs)
            if not isinstance(self_, OnDevice) and _is_sim(target):
                rest, kw = _strip_device(args, kwargs) if func is _Tensor.to else (args[:1], {})
                kw.pop("non_blocking", None)
                return on_device(_Tensor.to(*rest, **kw).clone())
        elif _is_sim(kwargs.get("device")) and not any(isinstance(t, OnDevice) for t in _tensors(args)):
            return on_device(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_device() -> Iterator[list[tuple[str, str]]]:
    """Run a block with the simulated device available; yields the transfers it records."""
    _local.transfers = []
    with _SimMode():
        yield _local.transfers
