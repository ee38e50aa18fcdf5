"""Test-only helpers: the vLLM/HF parity harness, the real-server launcher and the Triton-mode runner.

Imported as ``helpers.*``: pytest puts ``tests/`` on ``sys.path`` (rootdir conftest, prepend mode);
scripts outside pytest run with ``PYTHONPATH=tests``.
"""
