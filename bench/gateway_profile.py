"""Server CPU per request of llm-api as a gateway, with production-like settings.

    python -m bench.gateway_profile [--requests 2000] [--concurrency 4] [--mode both]
                                    [--rounds 1] [--as-gateway-bench] [--profile]
                                    [--database-url URL]

The app runs in this process under uvicorn (uvloop, httptools) in front of bench/stub_upstream.py
(a subprocess, 32 tokens at once); the load generator is another subprocess (aiohttp, closed loop),
so this process's CPU time (`getrusage`, user and system separately) is the server's alone (the
usage flusher's database writes included). Settings: auth ON with an API key of a paid user, rate
limits ON (memory store; limits raised so none refuses), response cache ON (memory store; the
requests carry temperature 0.7, so every one is a miss), usage records ON, access log at INFO as
JSON lines to /dev/null. `--as-gateway-bench` uses bench/gateway.py's settings instead (auth, rate
limits and cache off, WARNING), the ones its 40%-of-direct target is measured with. `--rounds`
repeats the measurement (the spread between rounds shows the machine's noise; to compare two source
trees, run them alternately with PYTHONPATH=<tree>/src). `--profile` adds a cProfile of the
measured requests (top functions by own time); its overhead inflates the figures, so the µs/request
line is measured without it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.gateway import free_port, stub

BODY: dict[str, Any] = {
    "model": "stub",
    "messages": [{"role": "user", "content": "Say something."}],
    "max_tokens": 32,
    "temperature": 0.7,
}
UNLIMITED = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "concurrent_requests": 10**6,
    "tokens_per_day": 10**15,
}


# --- the load generator (a subprocess) -------------------------------------------------------


async def client(url: str, key: str, n: int, concurrency: int, stream: bool) -> None:
    import aiohttp

    body = orjson.dumps({**BODY, "stream": stream})
    headers = {"Content-Type": "application/json"}
    if key:  # none when the server runs with auth off (--as-gateway-bench)
        headers["Authorization"] = f"Bearer {key}"
    errors: list[str] = []
    left = n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as r:
                    raw = await r.read()
                    if r.status != 200 or (stream and not raw.endswith(b"data: [DONE]\n\n")):
                        errors.append(f"{r.status} {raw[:200]!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}", file=sys.stderr)  # noqa: T201
        sys.exit(1)


# --- the server (this process) ---------------------------------------------------------------


async def drive(url: str, key: str, n: int, concurrency: int, stream: bool) -> None:
    args = [sys.executable, "-m", "bench.gateway_profile", "--client", url, "--key", key]
    args += ["--requests", str(n), "--concurrency", str(concurrency)]
    args += ["--stream"] if stream else []
    proc = await asyncio.create_subprocess_exec(*args)
    if await proc.wait() != 0:
        raise RuntimeError("the load generator failed")


async def serve(args: argparse.Namespace, tmp: Path, stub_port: int) -> None:
    import uvicorn

    from llm_api.core.config import Settings
    from llm_api.http_server import server_options
    from llm_api.main import create_app
    from llm_api.services.auth import api_keys

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
    production = not args.as_gateway_bench
    settings = Settings(
        models_file=tmp / "models.json",
        data_dir=tmp / "data",
        database_url=args.database_url,
        db_auto_migrate=True,
        auth_enabled=production,
        rate_limit_enabled=production,
        rate_limit_tiers={"paid": UNLIMITED, "ip": UNLIMITED},
        cache_enabled=production,
        warmup=False,
        log_level="INFO" if production else "WARNING",
        log_json=True,  # as in production
    )
    app = create_app(settings)
    # The access log (INFO) is formatted and written, to nowhere: its cost counts.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    port = free_port()
    # `llm-api serve`'s HTTP settings (its protocol; no proxy or server headers).
    config = uvicorn.Config(
        app,
        port=port,
        loop="none",
        log_level="warning",
        access_log=False,
        **server_options(settings.fast_path),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    state = app.state.llm_api
    while not state.llm.ready:
        await asyncio.sleep(0.05)
    key = ""
    if production:
        async with state.db.sessions.begin() as db:
            email = f"bench-{os.getpid()}-{time.time_ns()}@example.com"
            user = await state.auth.users.create(db, email, "pw-" + "x" * 20, tier="paid")
            _, key = await api_keys.create_key(db, user.id, "bench")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    modes = {"stream": [True], "json": [False], "both": [True, False]}[args.mode]
    try:
        for stream in modes:
            name = "stream" if stream else "non-stream"
            await drive(url, key, 300, args.concurrency, stream)  # warm-up
            for _ in range(args.rounds):
                ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                await drive(url, key, args.requests, args.concurrency, stream)
                ru1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
                user, sys_ = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
                per = 1e6 / args.requests
                print(  # noqa: T201 - the benchmark's output
                    f"{name}: {args.requests} requests, concurrency {args.concurrency}: "
                    f"server CPU {(user + sys_) * per:.0f} µs/request "
                    f"(user {user * per:.0f}, system {sys_ * per:.0f}), "
                    f"{args.requests / wall:.0f} req/s wall",
                    flush=True,
                )
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                await drive(url, key, args.requests, args.concurrency, stream)
                prof.disable()
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
                stats.print_stats(args.top)
                print(f"--- cProfile ({name}), by own time ---\n{out.getvalue()}")  # noqa: T201
                if args.dump:
                    prof.dump_stats(f"{args.dump}-{name}.prof")
    finally:
        server.should_exit = True
        await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--mode", choices=["stream", "json", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per mode")
    parser.add_argument(
        "--as-gateway-bench",
        action="store_true",
        help="bench/gateway.py's settings: auth, rate limits and cache off, WARNING",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--dump", help="write the cProfile stats to DUMP-<mode>.prof")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.client:
        uvloop.run(client(args.client, args.key, args.requests, args.concurrency, args.stream))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-gwprof-"))
    stub_port = free_port()
    with stub(stub_port, tmp):
        uvloop.run(serve(args, tmp, stub_port))


if __name__ == "__main__":
    main()
