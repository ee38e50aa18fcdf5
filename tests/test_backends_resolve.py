"""The wrapped backends resolve through the CUDA platform's path, not only through the registry's.

``vllm/platforms/cuda.py`` (``_backend_cls_path``) hands the selector ``cls.__module__ + "." +
cls.__qualname__`` of the backend class it selected (the registry override, i.e. our wrapped
class), and ``vllm/v1/attention/selector.py`` resolves that text with ``resolve_obj_by_qualname``.
The CPU platform returns the registered path instead, so only this check sees a name that does not
resolve. (``vllm.platforms.cuda`` itself cannot be imported without vLLM's CUDA build, hence the
same expression written out.)
"""

from __future__ import annotations

import pytest
from vllm.utils.import_utils import resolve_obj_by_qualname

from vllm_halluguard.engine.backends import wrapped
from vllm_halluguard.engine.guards import BACKENDS


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_wrapped_class_resolves_by_its_cuda_platform_path(name: str) -> None:
    cls = wrapped(name)
    module, qualname = cls.full_cls_name()  # what _backend_cls_path joins
    assert resolve_obj_by_qualname(f"{module}.{qualname}") is cls


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_registered_path_resolves_to_the_same_class(name: str) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_halluguard.engine.hooks import install_backends

    install_backends()
    path = AttentionBackendEnum[name].get_path()
    assert path.startswith("vllm_halluguard.engine.backends.")
    assert resolve_obj_by_qualname(path) is wrapped(name)
