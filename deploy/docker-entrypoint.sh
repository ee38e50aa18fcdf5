#!/bin/sh
# Container entrypoint: `docker run IMAGE MODEL [halluguard-serve / vllm serve arguments ...]`.
#
# Media fetching stays off (inline data: images only) unless the arguments turn it on
# (--allow-media-fetch or --allowed-media-domains); see docs/deployment.md.
#
# No attention-backend flag is needed: the plugin wraps the backend vLLM selects (FLASH_ATTN or
# TRITON_ATTN on NVIDIA GPUs). `exec` makes the server PID 1, so that it receives SIGTERM from
# `docker stop` / Kubernetes directly.
set -eu

# The API key comes from a file (a Docker/Compose secret) when HALLUGUARD_API_KEY_FILE is set: vLLM reads
# VLLM_API_KEY, which keeps the key out of the process arguments. A missing or empty file is fatal.
if [ -n "${HALLUGUARD_API_KEY_FILE:-}" ]; then
    if [ ! -s "$HALLUGUARD_API_KEY_FILE" ]; then
        echo "docker-entrypoint: API key file $HALLUGUARD_API_KEY_FILE is missing or empty" >&2
        exit 1
    fi
    VLLM_API_KEY="$(tr -d '\r\n' < "$HALLUGUARD_API_KEY_FILE")"
    export VLLM_API_KEY
fi

exec "${HALLUGUARD_PYTHON:-python3}" -m vllm_halluguard.server "$@"
