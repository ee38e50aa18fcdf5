"""Load generator for OpenAI-compatible chat servers: per-mitigation latency and overhead vs ``none``.

``python -m loadtest --help``; see ``docs/loadtest.md``.
"""
