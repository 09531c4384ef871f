"""Servers the benchmark starts itself, one at a time, on the same GGUF and thread count:
ours (`llm-api serve`), llama.cpp's `llama-server`, and llama-cpp-python's server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL_ID = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/v1/models"
    flags: str = ""  # human-readable summary for the report

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class Running:
    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        url = f"http://127.0.0.1:{self.spec.port}{self.spec.ready_path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited: {self.log_path.read_text(errors='replace')[-2000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(url, timeout=2)
                if r.status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{self.spec.name} not ready after {timeout}s")

    def rss_mib(self) -> float | None:
        """Resident memory of the server process (KV cache and weights included)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def ours(
    gguf: Path, *, threads: int, slots: int, ctx: int, workdir: Path, prefix_cache: bool = True
) -> ServerSpec:
    port = free_port()
    registry = workdir / "bench-models.yaml"
    registry.write_text(
        "models:\n"
        f"  - id: {MODEL_ID}\n"
        "    backend: llama_cpp\n"
        f"    gguf: {gguf}\n"
        "    engine: batched\n"
        f"    slots: {slots}\n"
        f"    context_length: {ctx}\n"
        f"    max_queue: {max(64, slots * 8)}\n"
        + ("" if prefix_cache else "    prefix_cache: false\n")
    )
    env = {
        "LLM_API_ENVIRONMENT": "development",
        "LLM_API_PORT": str(port),
        "LLM_API_MODELS_FILE": str(registry),
        "LLM_API_LLAMA_THREADS": str(threads),
        "LLM_API_DATA_DIR": str(workdir / "data"),
        "LLM_API_LOG_LEVEL": "WARNING",
        "LLM_API_AUTH_ENABLED": "false",
        "LLM_API_CACHE_ENABLED": "false",
        "LLM_API_CONVERSATION_LOG": "false",
        "LLM_API_JWT_SECRET": "bench-" + "x" * 40,
        # The keyless caller's tier has the free tier's limits (4 concurrent); the benchmark
        # keeps the limiter in the path with the paid tier's, as measured before that change.
        "LLM_API_RATE_LIMIT_TIERS": '{"anonymous": {"requests_per_minute": 600, '
        '"tokens_per_minute": 400000, "concurrent_requests": 16, "tokens_per_day": 20000000}}',
    }
    return ServerSpec(
        name="llm-api",
        argv=[sys.executable, "-m", "llm_api.cli", "serve"],
        port=port,
        env=env,
        ready_path="/ready",
        flags=f"engine=batched slots={slots} ctx/slot={ctx} threads={threads} "
        f"prefix_cache={str(prefix_cache).lower()}",
    )


def llama_server(binary: Path, gguf: Path, *, threads: int, slots: int, ctx: int) -> ServerSpec:
    port = free_port()
    argv = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(slots * ctx),  # llama-server splits -c over its slots
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--alias",
        MODEL_ID,
        "--no-webui",
    ]
    return ServerSpec(
        name="llama-server",
        argv=argv,
        port=port,
        ready_path="/health",
        flags=f"-np {slots} -c {slots * ctx} -t {threads} (continuous batching on by default)",
    )


def llama_cpp_python(gguf: Path, *, threads: int, ctx: int, python: str | None) -> ServerSpec:
    port = free_port()
    argv = [
        python or sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        MODEL_ID,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        # Its default cancels the running request whenever a new one arrives; off, requests
        # queue behind one global lock instead, which is the fair comparison.
        "--interrupt_requests",
        "False",
    ]
    return ServerSpec(
        name="llama-cpp-python",
        argv=argv,
        port=port,
        flags=f"n_ctx={ctx} threads={threads} interrupt_requests=False (one request at a time)",
    )
