"""Load generator for OpenAI-compatible chat servers: per-mitigation latency and overhead vs ``none``.

``halluguard-loadtest --help``; see ``docs/loadtest.md``.
"""
