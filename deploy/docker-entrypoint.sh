#!/bin/sh
# Container entrypoint: `docker run IMAGE MODEL [python -m server / vllm serve arguments ...]`.
#
# Media fetching stays off (inline data: images only) unless the arguments turn it on
# (--allow-media-fetch or --allowed-media-domains); see docs/deployment.md.
#
# Adds `--attention-backend CUSTOM` (the plugin's Triton backend, needed on GPU for mitigated
# requests) unless the arguments already choose a backend. HALLUGUARD_ATTENTION_BACKEND changes the
# default; set it to the empty string to add nothing. `exec` makes the server PID 1, so that it
# receives SIGTERM from `docker stop` / Kubernetes directly.
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

backend="${HALLUGUARD_ATTENTION_BACKEND-CUSTOM}"
for arg in "$@"; do
    case "$arg" in
        --attention-backend | --attention-backend=*) backend="" ;;
    esac
done
if [ -n "$backend" ]; then
    set -- "$@" --attention-backend "$backend"
fi
exec "${HALLUGUARD_PYTHON:-python3}" -m server "$@"
