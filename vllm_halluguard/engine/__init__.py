"""Engine glue: per-request state, attention backends and vLLM hooks (method math lives in methods/)."""
