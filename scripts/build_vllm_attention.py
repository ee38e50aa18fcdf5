"""Build an importable ``vllm`` folder holding only vLLM's Triton ``unified_attention``.

``benchmarks/kernel_bench.py --vllm-path DIR`` compares our kernel with vLLM's on a GPU machine
where vLLM is not installed. This script copies, from an installed vLLM 0.32, the module
``vllm/v1/attention/ops/triton_unified_attention.py`` and the sibling ``ops`` modules it imports
at top level (``triton_attention_helpers.py``), and writes minimal stand-ins for the other vLLM
modules they import (``vllm.envs``, ``vllm.logger``, ``vllm.platforms``, ``vllm.triton_utils``,
``vllm.v1.kv_cache_interface``). The import list is read from the source (``ast``), so a vLLM
version that imports anything else fails here, by name, instead of on the GPU machine.
Function-level imports (the INT4 KV-cache kernel) are not followed: those paths are not benchmarked.
vLLM's files are copied at run time and never committed here.

    .venv/bin/python scripts/build_vllm_attention.py --out build/vllm-attn
    python benchmarks/kernel_bench.py --vllm-path build/vllm-attn
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shutil
import sys
from pathlib import Path

OPS = "vllm.v1.attention.ops"
ENTRY = f"{OPS}.triton_unified_attention"

STUBS: dict[str, str] = {
    "vllm.envs": '''"""Stand-in for vllm.envs: the variables vLLM's Triton attention reads."""
import os

VLLM_BATCH_INVARIANT: bool = bool(int(os.getenv("VLLM_BATCH_INVARIANT", "0")))
''',
    "vllm.logger": '''"""Stand-in for vllm.logger."""
import logging


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
''',
    "vllm.platforms": '''"""Stand-in for vllm.platforms: an NVIDIA CUDA platform (or none)."""
import torch


class _CudaPlatform:
    @staticmethod
    def fp8_dtype() -> torch.dtype:
        return torch.float8_e4m3fn

    @staticmethod
    def is_device_capability_family(capability: int, device_id: int = 0) -> bool:
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        return (major * 10 + minor) // 10 == capability // 10


current_platform = _CudaPlatform()
''',
    "vllm.triton_utils": '''"""Stand-in for vllm.triton_utils."""
import triton
import triton.language as tl

__all__ = ["tl", "triton"]
''',
}


def top_level_imports(path: Path) -> dict[str, set[str]]:
    """``{module: names}`` of the module-level ``import`` / ``from`` statements of ``path``."""
    found: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, set())
    return found


def kv_quant_mode_stub(installed: Path) -> str:
    """``vllm.v1.kv_cache_interface`` with only ``KVQuantMode``'s members (names and values)."""
    source = (installed / "v1" / "kv_cache_interface.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "KVQuantMode":
            members = [
                f"    {stmt.targets[0].id} = {ast.unparse(stmt.value)}"
                for stmt in node.body
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
            ]
            head = '"""Stand-in for vllm.v1.kv_cache_interface."""\nfrom enum import IntEnum\n\n\n'
            return head + "class KVQuantMode(IntEnum):\n" + "\n".join(members) + "\n"
    raise SystemExit(f"KVQuantMode not found in {installed}/v1/kv_cache_interface.py")


def module_file(root: Path, module: str, package: bool = False) -> Path:
    parts = module.split(".")
    return root.joinpath(*parts, "__init__.py") if package else root.joinpath(*parts[:-1], parts[-1] + ".py")


def build(installed: Path, out: Path) -> list[str]:
    """Write the folder; returns the modules copied from ``installed``."""
    if out.exists():
        shutil.rmtree(out)
    stubs = dict(STUBS)
    stubs["vllm.v1.kv_cache_interface"] = kv_quant_mode_stub(installed)
    copied, queue = [], [ENTRY]
    while queue:
        module = queue.pop()
        if module in copied:
            continue
        src = installed.joinpath(*module.split(".")[1:]).with_suffix(".py")
        dst = module_file(out, module)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        copied.append(module)
        for imported in top_level_imports(src):
            if not imported.startswith("vllm"):
                continue
            if imported.startswith(OPS + "."):
                queue.append(imported)
            elif imported not in stubs:
                raise SystemExit(f"{module} imports {imported}, which has no stand-in here")
    for module, text in stubs.items():
        package = module in ("vllm.platforms", "vllm.triton_utils")
        path = module_file(out, module, package=package)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("vllm", "vllm.v1", "vllm.v1.attention", OPS):
        init = module_file(out, package, package=True)
        if not init.exists():
            init.write_text(f'"""{package} (minimal build for benchmarks)."""\n')
    return copied


def installed_vllm() -> Path:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no installed vllm found; pass --vllm-dir")
    return Path(next(iter(spec.submodule_search_locations)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/vllm-attn"), help="folder to (re)create")
    parser.add_argument("--vllm-dir", type=Path, default=None, help="an installed vllm package directory")
    args = parser.parse_args(argv)
    installed = args.vllm_dir or installed_vllm()
    copied = build(installed, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"built {args.out} ({size / 1024:.0f} KB) from {installed}: copied {', '.join(copied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
