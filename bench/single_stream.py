"""Single-stream output tokens/s of the local model: through the HTTP API vs in-process.

    .venv/bin/python -m bench.single_stream [--max-tokens 128] [--repeats 3]

Starts `llm-api serve` (built-in SmolLM2 registry, auth off on loopback, cache and rate limits
off) and streams one chat completion at a time with the official openai SDK; then runs
llama-cpp-python's `create_chat_completion` in this process on the same GGUF and prompt. Same
prompt, temperature 0, fixed max_tokens, EOS not ignored (the prompt is chosen so the model
writes past max_tokens; the table shows the tokens actually produced). Closed loop, one warm-up
run each, then `--repeats` timed runs.

Tokens/s = completion tokens / (time of last token - time of first token) ("decode"), and
completion tokens / whole request time ("e2e", which includes prompt processing and HTTP).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from llm_api.services.llm.registry import DEFAULT_MODEL_ID, builtin_registry

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "bench-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp),
        "LLM_API_PORT": str(port),
        "LLM_API_AUTH_ENABLED": "false",
        "LLM_API_CACHE_ENABLED": "false",
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_LOG_LEVEL": "WARNING",
    }
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "serve"], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited; see " + str(tmp / "server.log"))
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("server not ready")


def http_run(client: openai.OpenAI, max_tokens: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, last - first, time.perf_counter() - start


def inproc_run(llama: Any, max_tokens: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for chunk in llama.create_chat_completion(
        messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            tokens += 1  # llama-cpp-python streams one chunk per token
    return tokens, last - first, time.perf_counter() - start


def summarise(name: str, runs: list[tuple[int, float, float]]) -> str:
    # The first content chunk ends the prompt phase, so decode rate counts the tokens after it.
    decode = [(n - 1) / d for n, d, _ in runs if d > 0]
    e2e = [n / t for n, _, t in runs]
    toks = [n for n, _, _ in runs]
    return (
        f"| {name:<34} | {min(toks):>4}-{max(toks):<4} | {statistics.median(decode):7.1f} "
        f"({min(decode):.1f}-{max(decode):.1f}) | {statistics.median(e2e):7.1f} "
        f"({min(e2e):.1f}-{max(e2e):.1f}) |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import llama_cpp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(Path(tmp))
        try:
            # Auth is off on loopback: send no Authorization header at all (a bearer is checked).
            http_client = httpx.Client(
                event_hooks={"request": [lambda r: r.headers.pop("Authorization", None)]},
                timeout=600,
            )
            client = openai.OpenAI(
                base_url=f"{base}/v1", api_key="none", max_retries=0, http_client=http_client
            )
            http_run(client, 8)  # warm-up
            http = [http_run(client, args.max_tokens) for _ in range(args.repeats)]
        finally:
            proc.terminate()
            proc.wait(60)
        rows.append(summarise("HTTP API (llm-api serve, SSE)", http))

    gguf = builtin_registry().models[0].gguf_path()
    llama = llama_cpp.Llama(
        str(gguf), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    inproc_run(llama, 8)  # warm-up
    local = [inproc_run(llama, args.max_tokens) for _ in range(args.repeats)]
    rows.append(summarise("in-process create_chat_completion", local))
    llama.close()

    print(
        f"model {gguf.name}; prompt {PROMPT!r}; temperature 0; max_tokens {args.max_tokens}; "
        f"{args.repeats} runs after 1 warm-up; llama-cpp-python {llama_cpp.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"in-process threads {args.threads}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| path                               | tokens    | decode tok/s median (min-max) "
        "| e2e tok/s median (min-max) |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
