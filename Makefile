# Two commands matter: `make serve` (tiny LLaVA on CPU, OpenAI API on 127.0.0.1:$(PORT)) and
# `make test`. Both build the virtual environment on first use (scripts/ensure_venv.sh).
SHELL := /bin/bash
PY := .venv/bin/python
PORT ?= 8000
FIXTURE ?= llava
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint format serve serve-reclaim fixtures eval-testbed clean

venv:
	@bash scripts/ensure_venv.sh >/dev/null

# ruff, then mypy on the package (config in pyproject.toml).
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Rewrite the tree the way `make lint` wants it: ruff format, then ruff's safe fixes.
format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Two pytest workers, one per core. A group of test files stays on one worker (its shared engines and
# servers start once): each file is its own group unless tests/conftest.py's GROUPS joins files (its
# scheduler), and groups start longest first (its COST_S). The 30 slowest steps are listed at the end.
PYTEST_XDIST := -n 2 --dist loadfile
test: lint
	$(PY) -m pytest -q $(PYTEST_XDIST) --durations=30 $(PYTEST_ARGS)

# The quick loop: every test that starts no vLLM engine and no server (markers `engine`, `server`).
test-fast: venv
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not engine and not server" $(PYTEST_ARGS)

fixtures: venv
	$(PY) -m vllm_halluguard.tiny_models

# Small CPU settings: fp32, eager, short context, 256 MiB of KV cache.
serve: venv
	$(PY) -m vllm_halluguard.server --fixture $(FIXTURE) --host 127.0.0.1 --port $(PORT) \
	  --dtype float32 --enforce-eager --max-model-len 512 --max-num-seqs 16 \
	  --kv-cache-memory-bytes 268435456 --limit-mm-per-prompt '{"image": 1}'

# `make serve` with 32-token KV blocks and synchronous scheduling: PruneHal's reclaiming variant
# ({"method":"prunehal","selection":"shared","granularity":"block","block":32}) frees the tiny
# model's image-only block (docs/api.md, "PruneHal's block reclaim over HTTP").
serve-reclaim: venv
	$(PY) -m vllm_halluguard.server --fixture $(FIXTURE) --host 127.0.0.1 --port $(PORT) \
	  --dtype float32 --enforce-eager --max-model-len 512 --max-num-seqs 16 \
	  --kv-cache-memory-bytes 268435456 --limit-mm-per-prompt '{"image": 1}' \
	  --block-size 32 --no-async-scheduling

# Every method on the hermetic testbed (docs/evaluation.md): scenes, server, halluguard-eval.
eval-testbed: venv
	bash scripts/eval_testbed.sh eval-testbed 200

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
