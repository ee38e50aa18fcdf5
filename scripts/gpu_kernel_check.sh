#!/usr/bin/env bash
# One prepared GPU check of the attention kernel (issue 15), under 8 minutes on an H100/H200:
#   1. tests/test_kernels.py compiled on the GPU (no interpreter; --noconftest: no vLLM/pydantic);
#   2. benchmarks/kernel_bench.py, bf16, MHA 32/32 and GQA 28/4, against vLLM's unified_attention
#      loaded from a folder built by scripts/build_vllm_attention.py (where vLLM is installed).
# Usage: scripts/gpu_kernel_check.sh [VLLM_FOLDER=build/vllm-attn] [OUT_DIR=${OUT:-out}]
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_FOLDER=${1:-build/vllm-attn}
OUT_DIR=${2:-${OUT:-out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
timeout 240 "$PY" -m pytest --noconftest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT_DIR/test_kernels.txt"
VLLM_ARGS=()
if [ -d "$VLLM_FOLDER/vllm" ]; then VLLM_ARGS=(--vllm-path "$VLLM_FOLDER"); else echo "no $VLLM_FOLDER: vLLM columns skipped"; fi
timeout 300 "$PY" benchmarks/kernel_bench.py --dtype bf16 --heads 32/32 28/4 \
  --decode-batch 1 8 32 64 --context 600 2000 --prefill 1x2000 8x600 \
  --warmup 10 --rep 40 "${VLLM_ARGS[@]}" --json "$OUT_DIR/kernel_bench.json" | tee "$OUT_DIR/kernel_bench.md"
