"""``python -m vllm_halluguard.eval``: the ``halluguard-eval`` command."""

from .cli import main

raise SystemExit(main())
