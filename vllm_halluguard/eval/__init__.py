"""Pure scorers for object-hallucination benchmarks: CHAIR, POPE (with split builder), AMBER.

No model, no I/O: callers load the annotation JSON and pass dicts in; reports are pydantic models
(``report.model_dump_json()``). See ``docs/evaluation.md``.
"""

from . import amber, chair, pope

__all__ = ["amber", "chair", "pope"]
