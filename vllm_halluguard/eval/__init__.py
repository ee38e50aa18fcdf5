"""Object-hallucination evaluation: pure scorers (CHAIR, POPE with its split builder, AMBER) and a runner.

The scorers need no model and do no I/O: callers load the annotation JSON and pass dicts in; reports
are pydantic models (``report.model_dump_json()``). The runner (``halluguard-eval``: :mod:`.cli`;
:mod:`.runner` drives a run, :mod:`.client` sends each request, :mod:`.records` holds what is sent and
received, :mod:`.report` scores it) sends a dataset to any OpenAI-compatible server with one or several
``mitigation`` settings and scores the replies. See ``docs/evaluation.md``.
"""

from . import amber, chair, pope

__all__ = ["amber", "chair", "pope"]
