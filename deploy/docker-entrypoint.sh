#!/bin/sh
# Container entrypoint: `docker run IMAGE MODEL [python -m server / vllm serve arguments ...]`.
#
# Adds `--attention-backend CUSTOM` (the plugin's Triton backend, needed on GPU for mitigated
# requests) unless the arguments already choose a backend. HALLUGUARD_ATTENTION_BACKEND changes the
# default; set it to the empty string to add nothing. `exec` makes the server PID 1, so that it
# receives SIGTERM from `docker stop` / Kubernetes directly.
set -eu

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
