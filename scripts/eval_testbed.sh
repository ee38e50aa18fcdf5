#!/usr/bin/env bash
# Every mitigation on the hermetic testbed, through the real server and the evaluation runner.
# Writes probe and control scene folders, serves tests/testbed/model with `make serve`'s
# CPU settings, runs `halluguard-eval chair` on each split for all methods side by side, and leaves
# OUT/probe/report.md and OUT/control/report.md (see docs/evaluation.md).
#   usage: scripts/eval_testbed.sh [OUT] [N]     (defaults: eval-testbed, 200 scenes per split)
#   MODEL=DIR evaluates another testbed checkpoint (scenes follow the distribution it was trained on).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eval-testbed}
n=${2:-200}
port=${PORT:-8010}
model=${MODEL:-tests/testbed/model}
py=.venv/bin/python
# none and every registered method (vllm_halluguard.methods.METHODS), side by side
read -ra mitigations < <("$py" -c 'from vllm_halluguard.methods import METHODS
print(" ".join(f"--mitigation {m}" for m in ["none", *METHODS]))')
(( ${#mitigations[@]} )) || { echo "eval_testbed: cannot list the methods" >&2; exit 1; }
mkdir -p "$out"
for split in probe control; do
  PYTHONPATH=tests "$py" -m testbed.scenes --out "$out/scenes-$split" --split "$split" --n "$n" \
    --model "$model"
done
setsid "$py" -m vllm_halluguard.server "$model" --host 127.0.0.1 --port "$port" \
  --dtype float32 --enforce-eager --max-model-len 512 --max-num-seqs 16 \
  --kv-cache-memory-bytes 268435456 --limit-mm-per-prompt '{"image": 1}' >"$out/server.log" 2>&1 &
server=$!
trap 'kill -- -"$server" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { tail -20 "$out/server.log"; exit 1; }
  sleep 1
done
for split in probe control; do
  "$py" -m vllm_halluguard.eval chair --images "$out/scenes-$split/images" \
    --annotations "$out/scenes-$split/instances.json" --base-url "http://127.0.0.1:$port" \
    --prompt "Describe the image." --max-tokens 24 --concurrency 16 --no-progress \
    "${mitigations[@]}" --mitigation '["farsight", "kvsmooth"]' --mitigation '["kvsmooth", "prunehal"]' \
    --mitigation '["farsight", "prunehal"]' --mitigation '["scr", "kvsmooth"]' \
    --mitigation '["scr", "farsight"]' --mitigation '["scr", "prunehal"]' \
    --mitigation '["farsight", "kvsmooth", "prunehal"]' --out "$out/$split"
done
