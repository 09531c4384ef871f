"""schemathesis, driven by /openapi.json, against a live server (`llm-api serve`, an admin's API
key, a stub upstream model so that generation is instant): no request it generates — coverage,
fuzzing and stateful phases, every documented operation — gets a 5xx. The seed is fixed so CI
is reproducible; run `schemathesis` by hand without `--seed` to explore further."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_live_server

ROOT = Path(__file__).resolve().parents[1]
SEED = "20261127"


@pytest.fixture
def stub_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.stub_upstream", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    assert b"stub upstream on" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(30)


def admin_key(data_dir: Path) -> str:
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(data_dir),
    }
    cli = [sys.executable, "-m", "llm_api.cli"]
    email = "fuzz-admin@example.com"
    subprocess.run(
        [*cli, "users", "create", email, "--admin", "--password-stdin"],
        env=env,
        input=b"pw-fuzz-admin-123456\n",
        check=True,
        capture_output=True,
    )
    # Every scope, so the fuzzer reaches the key, account and admin routes too (a key is
    # inference-only by default).
    out = subprocess.run(
        [*cli, "keys", "create", email, "--scope", "inference,keys,account,admin"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_no_generated_request_gets_a_server_error(tmp_path: Path, stub_url: str) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "id": "m",
                        "backend": "router",
                        "concurrency": 64,
                        "deployments": [{"base_url": stub_url}],
                    }
                ]
            }
        )
    )
    data = tmp_path / "srv"
    server = start_live_server(data, {"LLM_API_MODELS_FILE": str(models)})
    try:
        key = admin_key(data)
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--header",
                f"Authorization: Bearer {key}",
                "--max-examples",
                "40",
                "--seed",
                SEED,
                "--no-color",
                # Deleting keys could revoke the key the run itself uses.
                "--exclude-path-regex",
                "^/v1/(keys/|admin/keys/)",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "generated" in run.stdout and " passed" in run.stdout
        assert "Server error" not in server.log.read_text()
    finally:
        server.stop()
