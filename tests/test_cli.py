"""The `llm-api` command (run as a subprocess, as a user would) and the settings' documentation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from llm_api.core.config import Settings
from llm_api.services.llm.registry import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "llm_api.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT
    )


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "models" in out.stdout


def test_serve_help_lists_options() -> None:
    out = run("serve", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--host", "--port", "--workers", "--config"):
        assert option in out.stdout


def test_models_lists_the_builtin_registry() -> None:
    out = run("models", env={"LLM_API_MODELS_FILE": ""})
    assert out.returncode == 0, out.stderr
    assert DEFAULT_MODEL_ID in out.stdout and "llama_cpp" in out.stdout


def test_models_reads_a_registry_file(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        "  - id: my-upstream\n    backend: openai\n    base_url: http://127.0.0.1:9/v1\n"
        "  - id: my-local\n    backend: llama_cpp\n    gguf: /models/x.gguf\n"
        "    context_length: 1024\n"
    )
    for args, env in (
        (["models", "--config", str(registry)], {}),
        (["models"], {"LLM_API_MODELS_FILE": str(registry)}),
    ):
        out = run(*args, env=env)
        assert out.returncode == 0, out.stderr
        assert "my-upstream" in out.stdout and "my-local" in out.stdout
        assert DEFAULT_MODEL_ID not in out.stdout


def test_models_rejects_a_bad_registry(tmp_path: Path) -> None:
    registry = tmp_path / "models.toml"
    registry.write_text('[[models]]\nid = "x"\nbackend = "nope"\n')
    out = run("models", "--config", str(registry))
    assert out.returncode != 0


def test_every_setting_is_documented_in_env_example() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(LLM_API_[A-Z0-9_]+)=", text, re.MULTILINE))
    expected = {f"LLM_API_{name.upper()}" for name in Settings.model_fields}
    assert not expected - documented, f"missing in .env.example: {sorted(expected - documented)}"
    assert not documented - expected, f"unknown in .env.example: {sorted(documented - expected)}"
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
