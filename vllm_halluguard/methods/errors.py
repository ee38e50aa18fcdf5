"""The typed error of the request contract."""

from __future__ import annotations


class SpecError(ValueError):
    """A method spec that cannot be served; ``reason`` is a short machine-readable label.

    Reasons: ``invalid_spec`` (wrong shape), ``unknown_method``, ``invalid_params`` (a field's value),
    ``unsupported`` (valid, but not served by the engine), ``model`` (no presets for the model),
    ``kv_cache`` (quantized KV cache), ``inputs`` (the request's prompt or images).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
