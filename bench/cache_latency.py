"""End-to-end latency of a response-cache hit: `python -m bench.cache_latency [--redis URL]`.

Starts `llm-api serve` (one uvicorn worker, auth off on loopback, rate limits off so only the
cache differs) once per cache backend: the in-process LRU, then Redis. Each run primes one
deterministic chat request (a miss that runs the model), then sends the same request
sequentially (closed loop, concurrency 1, keep-alive) and times each from send to the last byte:
non-streaming hits, streaming hits (a replayed SSE stream, read to `[DONE]`), and as the
baseline the same request with `Cache-Control: no-cache` (a model run). Three repeats; prints
p50/p99 in milliseconds per repeat and the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(redis_url: str | None) -> Iterator[str]:
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "bench-" + "x" * 40,
        "LLM_API_DATA_DIR": str(data),
        "LLM_API_PORT": str(port),
        "LLM_API_AUTH_ENABLED": "false",
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_LOG_LEVEL": "WARNING",
        "LLM_API_LLAMA_THREADS": "1",  # leave the other core to the load generator
        "LLM_API_REDIS_URL": redis_url or "",
    }
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "serve"], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (data / "server.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _body(prompt: str, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "temperature": 0,
        "stop": ["\n"],
        "stream": stream,
    }


def _time(http: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        for _ in resp.iter_bytes():
            pass
    return (time.perf_counter() - t0) * 1000, resp.headers.get("x-cache", "")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _run(base: str, requests: int, baseline: int) -> dict[str, list[float]]:
    prompt = f"Name one colour. ({uuid.uuid4().hex[:8]})"
    out: dict[str, list[float]] = {"hit": [], "hit_stream": [], "model": []}
    with httpx.Client(base_url=base, timeout=120) as http:
        _, state = _time(http, _body(prompt, False), {})  # prime: a miss that runs the model
        assert state == "miss", state
        for _ in range(20):  # warm-up
            _time(http, _body(prompt, False), {})
        for _ in range(requests):
            ms, state = _time(http, _body(prompt, False), {})
            assert state == "hit", state
            out["hit"].append(ms)
            ms, state = _time(http, _body(prompt, True), {})
            assert state == "hit", state
            out["hit_stream"].append(ms)
        for _ in range(baseline):
            ms, state = _time(http, _body(prompt, False), {"Cache-Control": "no-cache"})
            assert state == "miss", state
            out["model"].append(ms)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("--requests", type=int, default=300, help="hits per kind per repeat")
    parser.add_argument("--baseline", type=int, default=20, help="model runs per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    backends: list[tuple[str, str | None]] = [("memory", None)]
    if args.redis:
        backends.append(("redis", args.redis))
    print(f"{'backend':8} {'kind':11} {'repeat':>6} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for name, url in backends:
        with _server(url) as base:
            p50s: dict[str, list[float]] = {}
            for repeat in range(1, args.repeats + 1):
                result = _run(base, args.requests, args.baseline)
                for kind, values in result.items():
                    p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
                    p50s.setdefault(kind, []).append(p50)
                    print(
                        f"{name:8} {kind:11} {repeat:>6} {len(values):>5} {p50:8.2f} {p99:8.2f}",
                        flush=True,
                    )
            for kind, values in p50s.items():
                spread = max(values) - min(values)
                print(f"{name:8} {kind:11} p50 median {statistics.median(values):.2f} ms, "
                      f"spread {spread:.2f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
