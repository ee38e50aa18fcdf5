#!/usr/bin/env bash
# The prepared GPU check (issue 26): scripts/gpu_check.py, on the lent GPU machine as it is (torch,
# Triton; no vLLM, pydantic or pytest). The Python script enforces its own 420 s budget and writes
# each result to OUT_DIR/gpu_check.jsonl as it comes; `timeout 480` is only the outer safety net.
# No `set -e`: a failing stage is a result, and nothing here may stop the run before the others.
# Usage: scripts/gpu_kernel_check.sh [OUT_DIR=${OUT:-out}]
#   build/vllm-attn (scripts/build_vllm_attention.py, git-ignored) adds vLLM's Triton kernel when carried.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${1:-${OUT:-out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/gpu.txt" 2>&1
ARGS=()
if [ -d build/vllm-attn/vllm ]; then ARGS=(--vllm-path build/vllm-attn); else echo "no build/vllm-attn: vLLM columns skipped"; fi
timeout 480 "${PYTHON:-python3}" scripts/gpu_check.py --out "$OUT_DIR" --budget-s 420 "${ARGS[@]}" 2>&1 |
  tee "$OUT_DIR/gpu_check.log"
