"""Shared test settings.

Engines in tests run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each vLLM process pays
~20 s of imports on this CPU, and an in-process engine saves two of them. The server test runs the
real multi-process server, which also proves the plugin loads in vLLM's engine processes.
"""

import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, our Triton kernels run in Triton's interpreter; the variable must be set before
# any module decorates a kernel (vLLM's own Triton is disabled on its CPU build either way).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
