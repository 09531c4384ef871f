"""Instructions per proxied stream: llm-api as a gateway, counted by valgrind's callgrind.

    python -m bench.gateway_instructions [--requests 400] [--concurrency 50]

On a host whose speed drifts by tens of percent within minutes, timings cannot tell a 3% change
from noise; instruction counts can (repeated runs agree within ~1%). The server runs under
`valgrind --tool=callgrind` with instrumentation off; after a warm-up, `callgrind_control` turns
it on for the measured requests only, so startup and imports are not counted. Everything the
process executes is counted (the event loop and the usage writer's database thread alike), in
user space only: system calls are not, which is why timings (bench.gateway_profile) still
decide. Settings are bench/gateway.py's (auth, rate limits and cache off, usage records and
metrics on), in front of bench/stub_upstream.py streaming 32 tokens at once; the load generator
is a separate, uninstrumented process. To compare two source trees, run with
PYTHONPATH=<tree>/src. Needs valgrind (Debian: `apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.gateway import free_port, stub
from bench.gateway_profile import drive


async def serve(port: int, stub_port: int, tmp: Path) -> None:
    """The measured process: llm-api under uvicorn, as in bench.gateway_profile."""
    import uvicorn

    from llm_api.core.config import Settings
    from llm_api.http_server import server_options
    from llm_api.main import create_app

    models = [
        {
            "id": "stub",
            "backend": "router",
            "concurrency": 4096,
            "max_queue": 4096,
            "deployments": [{"base_url": f"http://127.0.0.1:{stub_port}/v1"}],
        }
    ]
    (tmp / "models.json").write_bytes(orjson.dumps({"models": models}))
    settings = Settings(
        models_file=tmp / "models.json",
        data_dir=tmp / "data",
        auth_enabled=False,
        rate_limit_enabled=False,
        cache_enabled=False,
        warmup=False,
        log_level="WARNING",
        log_json=True,
    )
    config = uvicorn.Config(  # with `llm-api serve`'s HTTP settings
        create_app(settings),
        port=port,
        loop="none",
        log_level="warning",
        access_log=False,
        **server_options(settings.fast_path),
    )
    await uvicorn.Server(config).serve()


def _wait_for(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server under valgrind exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server under valgrind did not start")


def _control(options: list[str], pid: int) -> None:
    command = ["callgrind_control", *options, str(pid)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(requests: int, concurrency: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="llm-api-ir-"))
    stub_port, port = free_port(), free_port()
    out = tmp / "callgrind.out"
    with stub(stub_port, tmp):
        args = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        args += [f"--callgrind-out-file={out}", sys.executable, "-m", "bench.gateway_instructions"]
        args += ["--serve", str(port), "--stub-port", str(stub_port), "--tmp", str(tmp)]
        log = (tmp / "server.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(port, proc, time.monotonic() + 600)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            asyncio.run(drive(url, "", 100, concurrency, True))  # warm-up, not counted
            _control(["-i", "on"], proc.pid)
            asyncio.run(drive(url, "", requests, concurrency, True))
            _control(["-i", "off"], proc.pid)
            _control(["-d"], proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    total = 0
    for dump in tmp.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    shutil.rmtree(tmp, ignore_errors=True)
    return total / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, args.stub_port, Path(args.tmp)))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    ir = measure(args.requests, args.concurrency)
    print(  # noqa: T201 - the benchmark's output
        f"{args.requests} streams at {args.concurrency} concurrent: {ir:,.0f} instructions "
        "per request (callgrind, the server process, user space)"
    )


if __name__ == "__main__":
    main()
