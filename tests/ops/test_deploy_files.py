"""The deployment files, validated as far as this machine allows (no Docker engine): hadolint
for the Dockerfile, the compose-spec schema for the compose file, the Kubernetes OpenAPI schemas
for the manifests, parsing plus the rules we rely on for the platform files, the gunicorn
config's numbers and worker rule, `fastapi run`, and the image recipe's pip steps."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from llm_api.core import metrics as metrics_module
from llm_api.core.config import Settings
from llm_api.core.serving import plan
from llm_api.services.llm.registry import Registry, load_registry
from tests.conftest import IN_CI, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DRAIN_DEFAULT = Settings.model_fields["drain_timeout"].default


def run(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def k8s(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "deploy/k8s" / name).read_text())
    return doc


# --- Docker --------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = run(str(BIN / "hadolint"), "docker/Dockerfile.prod")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "docker/Dockerfile.prod").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "--require-hashes -r requirements/prod.txt" in text.split("AS runtime")[0]
    assert re.search(r"^USER 10001", runtime, re.M)  # non-root
    instructions = "\n".join(ln for ln in runtime.splitlines() if not ln.startswith("#"))
    assert "HEALTHCHECK" in runtime and "/health" in runtime and "curl" not in instructions
    assert "build-essential" not in runtime and "cmake" not in runtime
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py"]' in runtime
    assert "--reload" not in text


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"  # deny by default
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"requirements/", "pyproject.toml", "README.md", "src/", "gunicorn.conf.py"}
    assert "**/.env" in lines


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker/docker-compose.prod.yml").read_text())
    return doc


def test_compose_matches_compose_spec() -> None:
    schema_path = (
        Path(__import__("check_jsonschema").__file__).parent
        / "builtin_schemas/vendor/compose-spec.json"
    )
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(compose(), schema)


def test_compose_services_and_ordering() -> None:
    services = compose()["services"]
    assert set(services) == {"migrate", "api", "worker", "redis", "postgres"}
    assert services["migrate"]["command"] == ["llm-api", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"  # runs once
    for name in ("api", "worker"):
        dep = services[name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]
    assert "--requirepass" in services["redis"]["command"]
    # stop_grace_period must cover gunicorn's graceful_timeout (drain + 15 s).
    grace = int(services["api"]["stop_grace_period"].rstrip("s"))
    assert grace > int(services["api"]["environment"]["LLM_API_DRAIN_TIMEOUT"]) + 15


def test_docker_compose_config_when_available() -> None:
    if run("docker", "compose", "version").returncode != 0:
        pytest.skip("the docker compose plugin is not installed here (schema test covers it)")
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "REDIS_PASSWORD": "y", "LLM_API_JWT_SECRET": "z"}
    result = run("docker", "compose", "-f", "docker/docker-compose.prod.yml", "config", env=env)
    assert result.returncode == 0, result.stderr


# --- Kubernetes ----------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    files = sorted(str(p) for p in (ROOT / "deploy/k8s").glob("*.yaml"))
    result = run(str(BIN / "kubernetes-validate"), "--strict", "--no-warn", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)


def test_k8s_api_deployment_probes_and_shutdown() -> None:
    dep = k8s("api-deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    api = pod["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["resources"]["requests"]["cpu"] and api["resources"]["limits"]["memory"]
    pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(k8s("configmap.yaml")["data"]["LLM_API_DRAIN_TIMEOUT"])
    # preStop + drain + gunicorn's margin (graceful_timeout = drain + 15) fit in the grace period
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 15
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in api["env"] if "valueFrom" in e}
    assert secret_refs == {"llm-api-secrets"}
    assert not any("JWT" in k or "TOKEN" in k for k in k8s("configmap.yaml")["data"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    prom_dir = k8s("configmap.yaml")["data"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(m["mountPath"] == prom_dir for m in api["volumeMounts"])


def test_k8s_hpa_scales_on_cpu_and_queue_depth() -> None:
    hpa = k8s("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "llm_api_num_requests_waiting"
    rules = k8s("prometheus-adapter-rules.yaml")["data"]["config.yaml"]
    assert metrics_module.REQUESTS_WAITING._name in rules  # the adapter maps our real metric


def test_k8s_worker_and_service() -> None:
    worker = k8s("worker-deployment.yaml")
    assert worker["kind"] == "Deployment"
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"] == ["llm-api", "worker"]
    service = k8s("service.yaml")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"


# --- other platforms -----------------------------------------------------------------------------


def test_procfile_and_systemd_unit() -> None:
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert "gunicorn -c gunicorn.conf.py" in procfile["web"]
    assert procfile["release"].endswith("llm-api db upgrade")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy/systemd/llm-api.service")
    service = unit["Service"]
    assert "gunicorn -c" in service["ExecStart"] and "--reload" not in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DRAIN_DEFAULT + 15
    assert service["User"] != "root"


def test_render_blueprint() -> None:
    bp = yaml.safe_load((ROOT / "render.yaml").read_text())
    services = {s["name"]: s for s in bp["services"]}
    web = services["llm-api"]
    assert web["type"] == "web" and web["healthCheckPath"] == "/health"
    assert web["dockerfilePath"] == "./docker/Dockerfile.prod"
    assert (ROOT / web["dockerfilePath"]).exists()
    redis = [s for s in bp["services"] if s["type"] == "keyvalue"]
    assert len(redis) == 1
    env = {e["key"]: e for e in web["envVars"] if "key" in e}
    assert env["LLM_API_REDIS_URL"]["fromService"]["name"] == redis[0]["name"]
    assert env["LLM_API_DATABASE_URL"]["fromDatabase"]["name"] == bp["databases"][0]["name"]
    # The JWT secret: generated by Render in the group both services use (never a literal).
    groups = {g["name"]: {e["key"]: e for e in g["envVars"]} for g in bp["envVarGroups"]}
    assert {"fromGroup": "llm-api-shared"} in web["envVars"]
    assert groups["llm-api-shared"]["LLM_API_JWT_SECRET"].get("generateValue") is True
    assert services["llm-api-worker"]["type"] == "worker"


def test_fly_toml() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["build"]["dockerfile"] == "docker/Dockerfile.prod"
    checks = fly["http_service"]["checks"]
    assert [c["path"] for c in checks] == ["/health"]
    assert fly["kill_signal"] == "SIGTERM" and fly["kill_timeout"] > DRAIN_DEFAULT + 15
    assert fly["http_service"]["internal_port"] == 8000


def test_railway_json() -> None:
    railway = json.loads((ROOT / "railway.json").read_text())
    deploy = railway["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert "gunicorn -c gunicorn.conf.py" in deploy["startCommand"]
    assert deploy["drainingSeconds"] > DRAIN_DEFAULT
    assert railway["build"]["dockerfilePath"] == "docker/Dockerfile.prod"


# --- Grafana -------------------------------------------------------------------------------------


def test_grafana_dashboard_uses_only_real_metrics() -> None:
    dash = json.loads((ROOT / "deploy/grafana/llm-api.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    defined = {
        m._name
        for m in vars(metrics_module).values()
        if hasattr(m, "_name") and hasattr(m, "_type")
    }
    ours = {name for name in defined if name.startswith("llm_api:")}
    names = r"(llm_api:[a-z0-9_]+?)(?:_total|_bucket|_count|_sum)?\b"
    used = set(re.findall(names, " ".join(exprs)))
    assert used and used <= ours, used - ours
    assert ours - {metrics_module.DRAINING._name} <= used | {metrics_module.DRAINING._name}
    assert any("process_resident_memory_bytes" in e for e in exprs)
    # The HTTP panels use the instrumentator-named metrics the access log records.
    http_names = r"(llm_api_http_[a-z0-9_]+?)(?:_total|_bucket|_count|_sum)?\b"
    http_used = set(re.findall(http_names, " ".join(exprs)))
    assert "llm_api_http_requests" in http_used and http_used <= defined, http_used - defined
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --- gunicorn config and the worker rule ---------------------------------------------------------


def test_gunicorn_conf_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("LLM_API_WORKERS", "WEB_CONCURRENCY", "GUNICORN_TIMEOUT", "PORT", "GUNICORN_BIND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLM_API_DRAIN_TIMEOUT", "40")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_API_LLAMA_THREADS", "1")
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert conf["worker_class"] == "llm_api.gunicorn_worker.Worker"
    from llm_api.api.fastpath.http import OneWriteProtocol
    from llm_api.gunicorn_worker import Worker  # the class gunicorn will load exists
    from llm_api.http_server import HeadLimitedProtocol, server_options

    assert Worker.CONFIG_KWARGS["http"] is OneWriteProtocol
    assert Worker.CONFIG_KWARGS.items() >= server_options(True).items()  # as `llm-api serve`
    assert issubclass(OneWriteProtocol, HeadLimitedProtocol)  # 431 either way
    assert conf["wsgi_app"] == "llm_api.asgi:app"
    assert conf["workers"] == 1  # the built-in registry is one local model
    assert conf["graceful_timeout"] >= 40 + 15
    assert conf["timeout"] >= 60  # a heartbeat, not a request deadline
    assert conf["max_requests"] > 0 and 0 < conf["max_requests_jitter"] < conf["max_requests"]
    assert conf["preload_app"] is False and conf["accesslog"] is None
    assert callable(conf["child_exit"]) and callable(conf["on_starting"])
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    conf["on_starting"](None)
    assert not list(tmp_path.glob("*.db"))
    monkeypatch.setenv("PORT", "10000")
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["bind"] == "0.0.0.0:10000"


def upstream_only() -> Registry:
    return Registry.model_validate(
        {"models": [{"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9"}]}
    )


def test_worker_rule() -> None:
    local = load_registry(None)
    base = Settings(environment="development")
    assert plan(base, upstream_only(), 4, {}).workers == 9  # (2 × cores) + 1
    p = plan(base, local, 8, {})
    assert (p.workers, p.llama_threads) == (1, 8)  # one model copy, all cores
    two = Settings(environment="development", workers=2)
    assert (plan(two, local, 8, {}).workers, plan(two, local, 8, {}).llama_threads) == (2, 4)
    assert plan(base, upstream_only(), 4, {"WEB_CONCURRENCY": "3"}).workers == 3
    assert plan(two, upstream_only(), 4, {"WEB_CONCURRENCY": "3"}).workers == 2  # ours wins


# --- fastapi run ---------------------------------------------------------------------------------


def test_fastapi_run_serves_the_app(tmp_path: Path) -> None:
    """`fastapi run` finds the app through [tool.fastapi] in pyproject.toml. An upstream-only
    registry keeps this test from loading a model."""
    models = tmp_path / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {"models": [{"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9"}]}
        )
    )
    port = free_port()
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
        "LLM_API_MODELS_FILE": str(models),
    }
    log = tmp_path / "fastapi.log"
    proc = subprocess.Popen(
        [str(BIN / "fastapi"), "run", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    assert r.json()["status"] == "healthy"
                    break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(60)


# --- the image recipe's pip steps ----------------------------------------------------------------


@pytest.mark.skipif(
    not (IN_CI or os.environ.get("LLM_API_TEST_IMAGE_RECIPE")),
    reason="several minutes: runs in CI, or locally with LLM_API_TEST_IMAGE_RECIPE=1",
)
def test_dockerfile_pip_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    """Runs the builder stage's `pip install` lines, as written, in a fresh venv (the pip cache
    may supply the compiled llama-cpp-python wheel), then imports the app."""
    text = (ROOT / "docker/Dockerfile.prod").read_text()
    builder = text.split("AS runtime")[0]
    # Each RUN instruction with its continuation lines joined.
    runs = [
        re.sub(r"\\\n\s*", " ", run)
        for run in re.findall(r"^RUN ((?:[^\n]*\\\n)*[^\n]*)", builder, re.M)
    ]
    steps = [run for run in runs if run.startswith("pip install")]
    assert len(steps) == 2 and "requirements/models.txt" in steps[0], steps
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PIP_NO_CACHE_DIR", None)
    build = tmp_path / "build"
    build.mkdir()
    for item in ("requirements", "src"):
        shutil.copytree(ROOT / item, build / item)
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, build / item)
    for step in steps:
        result = subprocess.run(
            step, shell=True, cwd=build, env=env, capture_output=True, text=True, timeout=1500
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = subprocess.run(
        [str(venv / "bin/python"), "-c", "import llama_cpp, llm_api.main, uvicorn_worker"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    # The build's model step: the embedding model's GGUF made from the wheel the venv holds.
    assert any("prepare_models(" in run for run in runs)
    models = tmp_path / "models"
    code = "from llm_api.services.llm.registry import prepare_models; prepare_models("
    code += repr(str(models)) + ")"
    prepared = subprocess.run(
        [str(venv / "bin/python"), "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stderr
    assert list(models.rglob("*.gguf"))


# --- developer tooling ---------------------------------------------------------------------------

OWN_PY = [
    "gunicorn.conf.py",
    "src/llm_api/asgi.py",
    "src/llm_api/core/drain.py",
    "src/llm_api/core/metrics.py",
    "src/llm_api/core/redaction.py",
    "src/llm_api/core/serving.py",
    "src/llm_api/middleware/access_log.py",
    "src/llm_api/middleware/drain.py",
    "src/llm_api/services/observability.py",
    "src/llm_api/api/v1/endpoints/metrics.py",
    "tests/ops",
]


def test_pre_commit_config_and_lint_are_green() -> None:
    result = run(str(BIN / "pre-commit"), "validate-config", ".pre-commit-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    for cmd in (("ruff", "check"), ("ruff", "format", "--check")):
        result = run(str(BIN / cmd[0]), *cmd[1:], *OWN_PY)
        assert result.returncode == 0, result.stdout + result.stderr
    yaml_files = [
        "docker/docker-compose.prod.yml",
        "render.yaml",
        ".pre-commit-config.yaml",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy/k8s").glob("*.yaml")),
    ]
    config = "{extends: default, rules: {line-length: {max: 160}, document-start: disable}}"
    result = run(str(BIN / "yamllint"), "-s", "-d", config, *yaml_files)
    assert result.returncode == 0, result.stdout + result.stderr
