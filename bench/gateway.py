"""Gateway overhead: the same streaming chat request sent straight to a stub upstream, through
llm-api and through LiteLLM's proxy, in one run on one machine.

    python -m bench.gateway [--duration 5] [--litellm /tmp/litellm-venv/bin/litellm] [--pairs 5]

The stub (bench/stub_upstream.py) streams 32 tokens at once. The load generator is closed-loop
aiohttp (httpx's pool is the bottleneck at these rates) in this process, with uvloop; the servers
are subprocesses. llm-api runs with auth disabled on loopback (LLM_API_AUTH_ENABLED=false) and a
registry routing model `stub` to the stub; LiteLLM runs from its own venv with the equivalent
model_list, no database and no master key. Prints a Markdown section for bench/RESULTS.md. The
40%-of-direct verdict uses `--pairs` back-to-back direct/llm-api measurements at 50 streams (their
median ratio), since the table's rows are minutes apart on a host whose speed drifts; single pairs
spread by ±5 points on these hosts, so five by default (three before stop 18).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
BODY = orjson.dumps(
    {
        "model": "stub",
        "messages": [{"role": "user", "content": "Say something."}],
        "stream": True,
        "max_tokens": 32,
    }
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Phase:
    path: str
    concurrency: int
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def one(session: aiohttp.ClientSession, url: str, phase: Phase, body: bytes = BODY) -> None:
    t0 = time.perf_counter()
    ttft = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                phase.errors += 1
                return
            done = False
            async for line in r.content:
                if ttft is None and b"tok" in line:
                    ttft = time.perf_counter() - t0
                if line.startswith(b"data: [DONE]"):
                    done = True
            if not done or ttft is None:
                phase.errors += 1
                return
    except (aiohttp.ClientError, TimeoutError):
        phase.errors += 1
        return
    phase.ok += 1
    phase.ttft.append(ttft * 1000)
    phase.e2e.append((time.perf_counter() - t0) * 1000)


async def load(url: str, path: str, concurrency: int, duration: float, warmup: float) -> Phase:
    phase = Phase(path, concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + warmup
        scratch = Phase(path, concurrency)

        async def worker(target: Phase, until: float) -> None:
            while time.perf_counter() < until:
                await one(session, url, target)

        await asyncio.gather(*(worker(scratch, stop_at) for _ in range(concurrency)))
        cpu0 = _cpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(phase, t0 + duration) for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - t0
        phase.client_cpu = _cpu() - cpu0
    return phase


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def process(args: list[str], ready_url: str, env: dict[str, str], log: Path) -> Iterator[int]:
    proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log.open("wb"), stderr=-2)
    try:
        deadline = time.monotonic() + 300  # LiteLLM takes minutes to import on a busy machine
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited: {log.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(_hostport(ready_url), timeout=0.5),
            ):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{args} did not start: {log.read_text()[-3000:]}")
        time.sleep(1.0)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _hostport(url: str) -> tuple[str, int]:
    host, _, port = url.split("//", 1)[1].split("/", 1)[0].partition(":")
    return host, int(port)


def stub(port: int, tmp: Path, interval: float = 0.0) -> contextlib.AbstractContextManager[int]:
    args = [sys.executable, "-m", "bench.stub_upstream", "--port", str(port), "--tokens", "32"]
    args += ["--interval", str(interval)]
    return process(
        args, f"http://127.0.0.1:{port}", {"PYTHONPATH": str(ROOT)}, tmp / f"stub{port}.log"
    )


def llm_api(
    port: int, stubs: dict[str, int], tmp: Path, workers: int
) -> contextlib.AbstractContextManager[int]:
    models = [
        {
            "id": name,
            "backend": "router",
            "concurrency": 4096,
            "max_queue": 4096,
            "deployments": [{"base_url": f"http://127.0.0.1:{p}/v1", "max_connections": 4096}],
        }
        for name, p in stubs.items()
    ]
    cfg = tmp / "models.json"  # JSON is YAML
    cfg.write_bytes(orjson.dumps({"models": models}))
    env = {
        "LLM_API_MODELS_FILE": str(cfg),
        "LLM_API_AUTH_ENABLED": "false",
        "LLM_API_PORT": str(port),
        "LLM_API_WORKERS": str(workers),
        "LLM_API_LOG_LEVEL": "WARNING",
        "LLM_API_DATA_DIR": str(tmp / f"data{port}"),
        "LLM_API_WARMUP": "false",
        # LiteLLM runs with no limits, cache or database: measure the same gateway work here.
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_CACHE_ENABLED": "false",
    }
    args = [sys.executable, "-m", "llm_api.cli", "serve"]
    return process(args, f"http://127.0.0.1:{port}", env, tmp / f"llm-api{port}.log")


def litellm(
    exe: str, port: int, stub_port: int, tmp: Path, workers: int
) -> contextlib.AbstractContextManager[int]:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        "  - model_name: stub\n"
        "    litellm_params:\n"
        "      model: openai/stub\n"
        f"      api_base: http://127.0.0.1:{stub_port}/v1\n"
        "      api_key: sk-stub\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    # No DATABASE_URL (no DB) and no master key: unauthenticated, like llm-api with auth off.
    env = {
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    args = [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--num_workers", str(workers)]
    return process(args, f"http://127.0.0.1:{port}", env, tmp / f"litellm{port}.log")


def row(p: Phase, direct: Phase | None) -> str:
    def added(vals: list[float], base: list[float] | None, q: float) -> str:
        if base is None:
            return "—"
        return f"{pct(vals, q) - pct(base, q):+.2f}"

    dt, de = (direct.ttft, direct.e2e) if direct else (None, None)
    cells = [
        p.path,
        str(p.concurrency),
        f"{p.rps:.0f}",
        f"{pct(p.ttft, 50):.2f}",
        f"{pct(p.ttft, 99):.2f}",
        f"{pct(p.e2e, 50):.2f}",
        f"{pct(p.e2e, 99):.2f}",
        added(p.ttft, dt, 50),
        added(p.e2e, de, 50),
        added(p.e2e, de, 99),
        str(p.errors),
        f"{p.client_cpu / p.seconds:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    sp, slow_sp = free_port(), free_port()
    levels = [int(c) for c in args.concurrency.split(",")]
    out: list[str] = []
    phases: dict[tuple[str, int], Phase] = {}
    paired: list[float] = []
    with stub(sp, tmp), stub(slow_sp, tmp, interval=args.slow_interval):
        direct_url = f"http://127.0.0.1:{sp}/v1/chat/completions"
        for c in levels:
            phases["direct", c] = await load(direct_url, "direct", c, args.duration, args.warmup)
            _progress(phases["direct", c])
        for workers in (1, 4):
            port = free_port()
            with llm_api(port, {"stub": sp, "slow": slow_sp}, tmp, workers) as pid:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                for c in levels if workers == 1 else [50]:
                    phases[f"llm-api w={workers}", c] = await load(
                        url, f"llm-api ({workers} worker{'s' * (workers > 1)})", c,
                        args.duration, args.warmup,
                    )  # fmt: skip
                    _progress(phases[f"llm-api w={workers}", c])
                if workers == 1:
                    paired = await paired_ratios(direct_url, url, args)
                    out.append(await slow_streams(port, pid, args.slow_streams))
            if args.litellm:
                port = free_port()
                try:
                    with litellm(args.litellm, port, sp, tmp, workers):
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        for c in levels if workers == 1 else [50]:
                            name = f"LiteLLM ({workers} worker{'s' * (workers > 1)})"
                            phases[f"litellm w={workers}", c] = await load(
                                url, name, c, args.duration, args.warmup
                            )
                            _progress(phases[f"litellm w={workers}", c])
                except RuntimeError as exc:  # LiteLLM may not start in time on a busy machine
                    out.append(f"\nLiteLLM with {workers} workers: {str(exc)[:300]}")
    header = (
        "| path | streams | req/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms"
        " | added TTFT p50 | added e2e p50 | added e2e p99 | errors | load-gen CPU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for (key, c), p in sorted(phases.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(row(p, None if key == "direct" else phases.get(("direct", c))))
    print("\n".join(lines))  # noqa: T201 - the benchmark's output
    if paired:
        out.append(
            f"\nPaired at 50 streams (direct, then llm-api with 1 worker at once; {len(paired)} "
            f"pairs): {', '.join(f'{r:.1%}' for r in paired)} of direct; median "
            f"{statistics.median(paired):.1%}."
        )
    print("\n".join(out))  # noqa: T201
    print(verdict(phases, paired))  # noqa: T201


async def paired_ratios(direct_url: str, url: str, args: argparse.Namespace) -> list[float]:
    """llm-api's share of direct at 50 streams, each measured right after its own direct phase.
    The table's two rows are a minute or more apart, and on a shared host the machine's speed
    drifts by that much; a pair measured back to back shares the drift, so its ratio does not."""
    ratios = []
    for _ in range(args.pairs):
        direct = await load(direct_url, "direct", 50, args.duration, args.warmup)
        gateway = await load(url, "llm-api (1 worker)", 50, args.duration, args.warmup)
        ratios.append(gateway.rps / direct.rps if direct.rps else 0.0)
        _progress(gateway)
    return ratios


async def slow_streams(port: int, pid: int, n: int) -> str:
    """Hold n slow streams (32 tokens, paced by the slow stub) through one llm-api worker."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = BODY.replace(b'"stub"', b'"slow"')
    await asyncio.sleep(1.0)
    idle = rss_kb(pid)
    phase = Phase("slow", n)
    peak = idle
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as s:
        t0 = time.perf_counter()
        task = asyncio.gather(*(one(s, url, phase, body) for _ in range(n)))
        while not task.done():
            peak = max(peak, rss_kb(pid))
            await asyncio.sleep(0.25)
        await task
        seconds = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    after = rss_kb(pid)
    return (
        f"\n{n} concurrent slow streams (32 tokens each, one llm-api worker): {phase.ok} ok, "
        f"{phase.errors} errors in {seconds:.1f} s; e2e p50 {pct(phase.e2e, 50):.0f} ms, "
        f"p99 {pct(phase.e2e, 99):.0f} ms; server RSS idle {idle / 1024:.1f} MiB, peak "
        f"{peak / 1024:.1f} MiB, after {after / 1024:.1f} MiB → "
        f"{(peak - idle) / max(n, 1):.1f} KB per stream."
    )


def verdict(phases: dict[tuple[str, int], Phase], paired: list[float] | None = None) -> str:
    lines = ["", "Targets:"]
    d1, g1 = phases.get(("direct", 1)), phases.get(("llm-api w=1", 1))
    if d1 and g1:
        added = pct(g1.e2e, 50) - pct(d1.e2e, 50)
        lines.append(f"- added e2e p50 at 1 stream ≤ 3 ms: {added:.2f} ms → {_met(added <= 3)}")
    d50, g50, l50 = (
        phases.get(("direct", 50)),
        phases.get(("llm-api w=1", 50)),
        phases.get(("litellm w=1", 50)),
    )
    if paired:  # the back-to-back pairs when measured (see paired_ratios), else the table
        share = statistics.median(paired)
        lines.append(
            f"- req/s at 50 streams ≥ 40% of direct (median of {len(paired)} back-to-back "
            f"pairs): {share:.1%} → {_met(share >= 0.4)}"
        )
    elif d50 and g50:
        share = g50.rps / d50.rps
        lines.append(f"- req/s at 50 streams ≥ 40% of direct: {share:.1%} → {_met(share >= 0.4)}")
    if g50 and l50:
        ratio = g50.rps / l50.rps if l50.rps else float("inf")
        lines.append(f"- req/s at 50 streams ≥ 5× LiteLLM: {ratio:.1f}× → {_met(ratio >= 5)}")
    return "\n".join(lines)


def _progress(p: Phase) -> None:
    print(  # noqa: T201 - progress on stderr while the run goes on
        f"# {p.path} x{p.concurrency}: {p.rps:.0f} req/s, e2e p50 {pct(p.e2e, 50):.2f} ms, "
        f"{p.errors} errors",
        file=sys.stderr,
        flush=True,
    )


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,50,200")
    parser.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    parser.add_argument("--slow-streams", type=int, default=1000)
    parser.add_argument("--slow-interval", type=float, default=0.25, help="seconds per token")
    parser.add_argument(
        "--pairs", type=int, default=5, help="back-to-back direct/llm-api pairs at 50 streams"
    )
    args = parser.parse_args()
    if args.litellm and not Path(args.litellm).exists():
        args.litellm = None
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
