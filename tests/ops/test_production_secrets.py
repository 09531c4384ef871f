"""Production secrets (core/secret_strength.py, Settings._refuse_weak_secrets), the development
secret's loopback-only rule at every way of starting the server, settings errors that never print
a value, and the deploy files: each runs in production mode, takes its secrets from outside and
sets its platform's proxy trust."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from gunicorn.config import Config
from pydantic import ValidationError

from llm_api.core.config import DEFAULT_JWT_SECRET, Settings
from llm_api.core.secret_strength import KNOWN_EXAMPLES, weakness
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GOOD = secrets.token_hex(32)


def production(**values: Any) -> Settings:
    return Settings(_env_file=None, environment="production", **values)  # type: ignore[arg-type,call-arg]


# --- which secrets production takes --------------------------------------------------------------


def shipped_examples() -> dict[str, list[str]]:
    """Every example secret this repository ships, read from the files themselves."""
    k8s = yaml.safe_load((ROOT / "deploy/k8s/secret.example.yaml").read_text())["stringData"]
    env = dict(re.findall(r"^(LLM_API_[A-Z_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    return {
        "jwt_secret": [k8s["LLM_API_JWT_SECRET"], env["LLM_API_JWT_SECRET"], DEFAULT_JWT_SECRET],
        "metrics_token": [k8s["LLM_API_METRICS_TOKEN"]],
        "database_url": [k8s["LLM_API_DATABASE_URL"]],
        "redis_url": [k8s["LLM_API_REDIS_URL"]],
    }


def test_every_shipped_example_secret_is_refused_in_production() -> None:
    examples = shipped_examples()
    assert len(examples["jwt_secret"][0]) == 63  # the k8s example the review found accepted
    for setting, values in examples.items():
        for value in values:
            extra = {} if setting == "jwt_secret" else {"jwt_secret": GOOD}
            with pytest.raises(ValidationError, match=f"LLM_API_{setting.upper()}") as err:
                production(**{setting: value}, **extra)
            assert value not in str(err.value)  # the message names the setting, not the value
    assert {v.lower() for v in examples["jwt_secret"]} <= KNOWN_EXAMPLES


@pytest.mark.parametrize(
    "weak",
    [
        "x" * 64,  # one repeated character
        "0123456789abcdef" * 4,  # a repeated block
        "abcdefghijklmnopqrstuvwxyz0123456789",  # a run
        "qwertyuiopasdfghjklzxcvbnm1234567890"[::-1][:20] * 2,  # a repeated block, reversed
        "correct-horse-battery-staple-orange-purple-monkey-dish",  # 8 words: ~103 bits
        "MyCompanyJwtSigningKeyForProductionUse2024",  # words, capitalized
        "my-jwt-signing-key-for-the-production-cluster",  # words
        "aB3$" * 10,  # a repeated block with every character class
        "this-is-the-secret-" + secrets.token_hex(16),  # a placeholder word
        secrets.token_hex(8),  # random but too short
    ],
    # Ids by position: the random values must not make the collected ids differ between runs
    # (pytest-xdist's workers each collect and must agree).
    ids=[
        "repeated-char",
        "repeated-block",
        "run",
        "reversed-block",
        "words",
        "capitalized-words",
        "words-dashed",
        "repeated-classes",
        "placeholder-word",
        "short-random",
    ],
)
def test_guessable_secrets_are_refused_in_production(weak: str) -> None:
    assert weakness(weak) is not None
    with pytest.raises(ValidationError, match="LLM_API_JWT_SECRET is not fit for production"):
        production(jwt_secret=weak)
    with pytest.raises(ValidationError, match="LLM_API_METRICS_TOKEN is not fit for production"):
        production(jwt_secret=GOOD, metrics_token=weak)


ENCODINGS = {  # what `openssl rand`, secrets.token_*() and Render's generateValue print
    "hex, 32 bytes": lambda b: b.hex(),
    "hex, 24 bytes": lambda b: b[:24].hex(),
    "base64url, 32 bytes": lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
    "base64, 32 bytes": lambda b: base64.b64encode(b).decode(),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_generated_secrets_are_accepted(encoding: str) -> None:
    """5000 random values of each kind (seeded, so the test is repeatable) are all accepted;
    100 000 draws refused one base64 value (the operator then generates another)."""
    rng = random.Random(20261207)
    values = [ENCODINGS[encoding](rng.randbytes(32)) for _ in range(5000)]
    refused = [v for v in values if weakness(v) is not None]
    assert not refused, refused
    production(jwt_secret=values[0], metrics_token=values[1])
    production(jwt_secret=secrets.token_hex(32), metrics_token=secrets.token_urlsafe(32))


def test_test_environment_keeps_the_length_rule_only() -> None:
    # Tests use a fixed, low-entropy secret; only production asks for a generated one.
    Settings(_env_file=None, environment="test", jwt_secret="test-secret-" + "x" * 40)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="LLM_API_JWT_SECRET"):
        production(jwt_secret="test-secret-" + "x" * 40)


# --- settings errors never print values ----------------------------------------------------------

CANARY_DB_PASSWORD = "Canary" + secrets.token_hex(12)


def test_settings_error_names_the_setting_not_its_value() -> None:
    weak = "replace-me-" + "0" * 40
    with pytest.raises(ValidationError) as err:
        production(
            jwt_secret=weak,
            metrics_token="metrics-" + CANARY_DB_PASSWORD,
            database_url=f"postgresql+asyncpg://llm_api:{CANARY_DB_PASSWORD}@db/llm_api",
        )
    text = str(err.value)
    assert "LLM_API_JWT_SECRET" in text and "placeholder" in text
    assert weak not in text and CANARY_DB_PASSWORD not in text and "input_value" not in text
    # Field errors too: which setting and why, not what was given.
    with pytest.raises(ValidationError) as err:
        production(jwt_secret=GOOD, trusted_proxies=[f"{CANARY_DB_PASSWORD}/8"])
    assert "trusted_proxies" in str(err.value) and CANARY_DB_PASSWORD not in str(err.value)
    with pytest.raises(ValidationError) as err:
        production(jwt_secret=GOOD, rate_limit_key_creation=CANARY_DB_PASSWORD)
    assert "rate_limit_key_creation" in str(err.value)
    assert CANARY_DB_PASSWORD not in str(err.value)


def bad_settings_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LLM_API_ENVIRONMENT": "production",
        "LLM_API_JWT_SECRET": "replace-me-" + CANARY_DB_PASSWORD,
        "LLM_API_METRICS_TOKEN": "token-" + CANARY_DB_PASSWORD,
        "LLM_API_DATABASE_URL": f"postgresql+asyncpg://llm_api:{CANARY_DB_PASSWORD}@db/llm_api",
        "LLM_API_DATA_DIR": str(tmp_path),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "llm_api.cli", "serve"],
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py"],
        [sys.executable, "-m", "llm_api.cli", "worker"],
    ],
    ids=["llm-api serve", "gunicorn", "llm-api worker"],
)
def test_a_refused_start_prints_no_secret(tmp_path: Path, command: list[str]) -> None:
    """What the operator's terminal or the platform's log shows when the server will not start:
    the setting and the reason, never the values (pydantic used to print the settings' tail)."""
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=bad_settings_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "LLM_API_JWT_SECRET is not fit for production" in output, output[-2000:]
    assert CANARY_DB_PASSWORD not in output, output[-2000:]


# --- the development secret serves only this machine ---------------------------------------------


@pytest.mark.parametrize("environment", ["development", "test", "production"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com"])  # noqa: S104
def test_default_secret_with_a_public_host_is_refused_everywhere(
    environment: str, host: str
) -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        Settings(_env_file=None, environment=environment, host=host)  # type: ignore[arg-type,call-arg]
    Settings(_env_file=None, environment="development", host="127.0.0.1")  # type: ignore[call-arg]


def dev_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_API_")}
    models = tmp_path / "models.yaml"  # upstream-only: nothing to load
    models.write_text(
        yaml.safe_dump(
            {"models": [{"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9"}]}
        )
    )
    return {
        **env,
        "LLM_API_ENVIRONMENT": "development",
        "LLM_API_DATA_DIR": str(tmp_path),
        "LLM_API_MODELS_FILE": str(models),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }


def test_serve_refuses_a_public_host_with_the_default_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_api.cli", "serve", "--host", "0.0.0.0"],  # noqa: S104
        cwd=ROOT,
        env={**dev_env(tmp_path), "COLUMNS": "400"},  # the message on one line
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "development default" in result.stdout + result.stderr


def test_gunicorn_refuses_a_public_bind_with_the_default_secret(tmp_path: Path) -> None:
    """`--bind` on the command line (as a Procfile writes it) wins over gunicorn.conf.py's bind,
    so the final addresses are checked when gunicorn starts."""
    port = free_port()
    result = subprocess.run(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--bind", f"0.0.0.0:{port}"],
        cwd=ROOT,
        env=dev_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Refusing to bind 0.0.0.0" in result.stdout + result.stderr


def test_gunicorn_hook_allows_loopback_and_unix_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runpy

    for key, value in dev_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LLM_API_JWT_SECRET", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    cfg = Config()
    cfg.set("bind", ["127.0.0.1:8000", "[::1]:8000", f"unix:{tmp_path}/sock"])
    conf["on_starting"](SimpleNamespace(cfg=cfg))
    cfg.set("bind", ["127.0.0.1:8000", "[::]:8000"])
    with pytest.raises(SystemExit, match="Refusing to bind"):
        conf["on_starting"](SimpleNamespace(cfg=cfg))


def own_public_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address  # noqa: S104


def test_fastapi_run_with_the_default_secret_serves_only_loopback(tmp_path: Path) -> None:
    """`fastapi run` binds 0.0.0.0 and tells the app nothing of it: the app itself answers 403
    to any connection that is not loopback to loopback, and serves this machine as before."""
    public = own_public_address()
    if public is None:
        pytest.skip("this machine has no non-loopback address to connect through")
    port = free_port()
    log = tmp_path / "fastapi.log"
    proc = subprocess.Popen(
        [str(BIN / "fastapi"), "run", "--host", "0.0.0.0", "--port", str(port)],  # noqa: S104
        cwd=ROOT,
        env=dev_env(tmp_path),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        remote = httpx.get(f"http://{public}:{port}/v1/models", timeout=5)
        assert remote.status_code == 403
        assert remote.json()["error"]["code"] == "development_secret"
        proxied = httpx.get(
            f"http://127.0.0.1:{port}/health", headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert proxied.status_code == 403  # a proxy on this machine relays other clients
    finally:
        proc.terminate()
        proc.wait(60)


# --- deploy files: production mode, secrets from outside, the platform's proxy trust -------------


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process started with `env` gets (no .env file, nothing else)."""
    keys = {k[len("LLM_API_") :].lower(): v for k, v in env.items() if k.startswith("LLM_API_")}
    old = {k: v for k, v in os.environ.items() if k.startswith("LLM_API_")}
    for k in old:
        del os.environ[k]
    try:
        os.environ.update({f"LLM_API_{k.upper()}": v for k, v in keys.items()})
        return Settings(_env_file=None)  # type: ignore[call-arg]
    finally:
        for k in [k for k in os.environ if k.startswith("LLM_API_")]:
            del os.environ[k]
        os.environ.update(old)


def shell_env(command: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `command` gives its program: the program is swapped for `env -0`."""
    swapped = re.sub(r"\b(gunicorn|llm-api)\b.*?(?='|$)", "env -0", command)
    result = subprocess.run(
        ["/bin/sh", "-c", swapped] if not command.startswith("/bin/sh") else shlex.split(swapped),
        env={"PATH": os.environ["PATH"], "PORT": "10000", **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.split("\0") if "=" in line)


def check_production(env: dict[str, str], where: str) -> Settings:
    """Production mode with a proxy trust, refused without a generated secret."""
    assert env.get("LLM_API_ENVIRONMENT") == "production", where
    assert "LLM_API_JWT_SECRET" not in env, f"{where}: a literal JWT secret"
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        settings_from(env)  # no secret supplied: the default is refused
    settings = settings_from({**env, "LLM_API_JWT_SECRET": GOOD})
    assert settings.environment == "production"
    return settings


def test_procfile_runs_production_with_the_routers_proxy_trust() -> None:
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert set(procfile) == {"release", "web", "worker"}
    for name, command in procfile.items():
        env = shell_env(command)
        check_production(env, f"Procfile {name}")
    web = check_production(shell_env(procfile["web"]), "Procfile web")
    assert "10.0.0.0/8" in web.trusted_proxies
    # An operator's own value wins over the default.
    mine = shell_env(procfile["web"], {"LLM_API_TRUSTED_PROXIES": "192.0.2.0/24"})
    assert mine["LLM_API_TRUSTED_PROXIES"] == "192.0.2.0/24"


def test_railway_start_command_runs_production_with_proxy_trust() -> None:
    deploy = json.loads((ROOT / "railway.json").read_text())["deploy"]
    env = shell_env(deploy["startCommand"])
    settings = check_production(env, "railway startCommand")
    assert "100.64.0.0/10" in settings.trusted_proxies
    for command in deploy["preDeployCommand"]:
        check_production(shell_env(command), "railway preDeployCommand")


def test_render_blueprint_generates_one_shared_secret() -> None:
    bp = yaml.safe_load((ROOT / "render.yaml").read_text())
    groups = {g["name"]: {e["key"]: e for e in g["envVars"]} for g in bp["envVarGroups"]}
    shared = groups["llm-api-shared"]
    assert shared["LLM_API_JWT_SECRET"] == {"key": "LLM_API_JWT_SECRET", "generateValue": True}
    env = {k: e["value"] for k, e in shared.items() if "value" in e}
    settings = check_production(env, "render envVarGroup")
    assert settings.trusted_proxies
    for service in bp["services"]:
        if service["type"] not in ("web", "worker"):
            continue
        assert {"fromGroup": "llm-api-shared"} in service["envVars"], service["name"]
        for entry in service["envVars"]:
            key = entry.get("key", "")
            if re.search(r"SECRET|TOKEN|PASSWORD", key):
                assert "value" not in entry, f"{service['name']}: literal {key}"


def test_fly_toml_runs_production_with_proxy_trust() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    settings = check_production(fly["env"], "fly.toml [env]")
    assert "172.16.0.0/12" in settings.trusted_proxies


def test_compose_runs_production_and_requires_its_secrets() -> None:
    doc = yaml.safe_load((ROOT / "docker/docker-compose.prod.yml").read_text())
    env = doc["services"]["api"]["environment"]
    assert env["LLM_API_ENVIRONMENT"] == "production"
    assert env["LLM_API_JWT_SECRET"].startswith("${LLM_API_JWT_SECRET:?")  # must be supplied
    assert "LLM_API_TRUSTED_PROXIES" in env  # set on purpose: none, the port is published


def test_kubernetes_runs_production_with_proxy_trust() -> None:
    data = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())["data"]
    settings = check_production(data, "k8s configmap")
    assert settings.trusted_proxies


def test_systemd_unit_forces_production_and_trusts_the_local_proxy() -> None:
    text = (ROOT / "deploy/systemd/llm-api.service").read_text()
    for line in re.findall(r"^ExecStart(?:Pre)?=(.*)$", text, re.M):
        assert line.startswith("/usr/bin/env LLM_API_ENVIRONMENT=production "), line
    proxies = re.search(r"^Environment=LLM_API_TRUSTED_PROXIES=(.*)$", text, re.M)
    assert proxies is not None
    settings = settings_from(
        {
            "LLM_API_ENVIRONMENT": "production",
            "LLM_API_JWT_SECRET": GOOD,
            "LLM_API_TRUSTED_PROXIES": proxies.group(1),
        }
    )
    assert settings.trusted_proxies == ["127.0.0.1/32", "::1/128"]


def test_dockerfile_defaults_to_production() -> None:
    text = (ROOT / "docker/Dockerfile.prod").read_text()
    assert "LLM_API_ENVIRONMENT=production" in text
    assert "JWT_SECRET" not in text
