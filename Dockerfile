# vllm-halluguard on the official vLLM image (GPU). vLLM, its CUDA torch and every runtime
# dependency of this package come from the base image; the package is installed with --no-deps so
# that pip never touches them.
#
#   docker build -t vllm-halluguard .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache vllm-halluguard \
#       llava-hf/llava-1.5-7b-hf --default-mitigation kvsmooth
#
# Same vLLM version as pyproject.toml's `gpu` extra and requirements/gpu.txt.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

# No usage statistics leave the node (vLLM's usage reporting is off; `-e VLLM_NO_USAGE_STATS=0 -e
# DO_NOT_TRACK=0` turns it back on).
# Caches (model weights, vLLM's and Triton's compile caches) live under /cache: mount a volume there.
ENV HOME=/home/halluguard \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache \
    HALLUGUARD_PORT=8000 \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

WORKDIR /opt/vllm-halluguard
COPY pyproject.toml README.md ./
# vllm_halluguard/server and vllm_halluguard/loadtest are relative links to the two folders below:
# COPY keeps them as links, and the wheel build copies the files they point to.
COPY vllm_halluguard ./vllm_halluguard
COPY server ./server
COPY loadtest ./loadtest

# Install without dependencies, then fail the build if the image's packages do not satisfy ours
# (pydantic, safetensors, tokenizers, transformers, pillow, numpy: all vLLM dependencies).
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "from importlib.metadata import requires, version; from packaging.requirements import Requirement; reqs = [Requirement(r) for r in requires('vllm-halluguard')]; bad = [f'{r} (have {version(r.name)})' for r in reqs if r.marker is None and not r.specifier.contains(version(r.name), prereleases=True)]; assert not bad, bad" \
    && python3 -c "from importlib.metadata import entry_points; assert entry_points(group='vllm.general_plugins', name='halluguard')" \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/halluguard --shell /usr/sbin/nologin halluguard \
    && mkdir -p /cache \
    && chown halluguard:halluguard /cache

COPY --chmod=755 deploy/docker-entrypoint.sh /usr/local/bin/halluguard-entrypoint
# Numeric, so that Kubernetes runAsNonRoot can verify it.
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000

# Model loading takes minutes: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HALLUGUARD_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["/usr/local/bin/halluguard-entrypoint"]
CMD ["--help"]
