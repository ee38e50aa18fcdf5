"""Shared test settings.

Engines in tests run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each vLLM process pays
~20 s of imports on this CPU, and an in-process engine saves two of them. The server test runs the
real multi-process server, which also proves the plugin loads in vLLM's engine processes.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
