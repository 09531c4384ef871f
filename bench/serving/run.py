"""Orchestration: start each server in turn (never two at once: they would share the 2 cores),
warm it up, run every load level, stop it; repeat; then write the reports."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.serving import loadgen, report, servers
from bench.serving.stats import RunSummary, summarise

log = logging.getLogger("bench")

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map. "
    "Describe every scene, character and conversation in detail."
)
ALL_SERVERS = ("llm-api", "llama-server", "llama-cpp-python")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Serving benchmark for OpenAI-compatible endpoints (TTFT, ITL, e2e, tok/s).",
    )
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="managed servers to start in turn: llm-api, llama-server, llama-cpp-python",
    )
    p.add_argument("--url", help="benchmark this running endpoint (…/v1) instead of starting any")
    p.add_argument("--model", default=servers.MODEL_ID, help="model name sent in requests")
    p.add_argument("--api-key", help="Bearer token for --url")
    p.add_argument("--concurrency", default="1,8,16", help="closed-loop stream counts")
    p.add_argument("--rate", help="Poisson arrival rates per second (open loop), e.g. 0.5,1,2")
    p.add_argument("--requests-per-stream", type=int, default=3, help="closed loop: N = C × this")
    p.add_argument("--min-requests", type=int, default=8, help="closed loop: at least this many")
    p.add_argument("--num-requests", type=int, default=32, help="Poisson: requests per rate")
    p.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="closed loop: spread the streams' first requests over this many seconds",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (llama-server)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--same-prompt", action="store_true", help="identical prompts (else numbered per request)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="requests before measuring")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--slots", type=int, default=16, help="parallel sequences (ours, llama-server)")
    p.add_argument("--ctx", type=int, default=2048, help="context per slot")
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="ours: evaluate every prompt whole (default: reuse a slot's KV for a shared "
        "prompt prefix, as llama-server does)",
    )
    p.add_argument("--gguf", type=Path, help="model file (default: the built-in SmolLM2 GGUF)")
    p.add_argument(
        "--lcp-python", help="python with llama-cpp-python[server] (default: this interpreter)"
    )
    p.add_argument("--out", type=Path, help="output directory (default bench/out/<timestamp>)")
    return p.parse_args(argv)


def _levels(text: str | None, cast: type = float) -> list[Any]:
    return [cast(x) for x in text.split(",") if x.strip()] if text else []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_levels(
    name: str,
    w: loadgen.Workload,
    args: argparse.Namespace,
    repeat: int,
    server: servers.Running | None,
) -> list[RunSummary]:
    out: list[RunSummary] = []
    if args.warmup:
        asyncio.run(loadgen.closed_loop(w, 1, args.warmup))
    plan: list[tuple[str, float]] = [("closed", c) for c in _levels(args.concurrency, int)]
    plan += [("poisson", r) for r in _levels(args.rate)]
    for mode, level in plan:
        cpu0 = _cpu_seconds()
        if mode == "closed":
            n = max(int(level) * args.requests_per_stream, args.min_requests)
            results = asyncio.run(loadgen.closed_loop(w, int(level), n, args.stagger))
        else:
            results = asyncio.run(loadgen.poisson(w, level, args.num_requests, rng_seed=repeat))
        s = summarise(name, mode, level, repeat, results)
        s.loadgen_cpu_s = _cpu_seconds() - cpu0
        s.server_rss_mib = server.rss_mib() if server else None
        log.info(
            "%s %s=%g rep=%d: %.1f tok/s, TTFT p95 %.0f ms, ITL mean %.1f ms, failures %d",
            name,
            mode,
            level,
            repeat,
            s.output_tok_s,
            s.ttft_ms["p95"],
            s.itl_ms["mean"],
            s.failures,
        )
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H-%M-%S")
    out = args.out or Path("bench/out") / started
    out.mkdir(parents=True, exist_ok=True)
    workload = loadgen.Workload(
        base_url=args.url or "",
        model=args.model,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        same_prompt=args.same_prompt,
    )
    meta: dict[str, Any] = {
        "started": started,
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, no pinning",
        "load average before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "llama-cpp-python": importlib.metadata.version("llama-cpp-python"),
        "git commit": _git_commit(),
        "workload": (
            f"closed loop at {args.concurrency} streams"
            + (f"; Poisson at {args.rate} req/s × {args.num_requests}" if args.rate else "")
            + f"; max_tokens {args.max_tokens}, temperature {args.temperature}, "
            f"ignore_eos {'on' if args.ignore_eos else 'off'}; "
            f"{'identical prompts' if args.same_prompt else 'prompts numbered per request'}; "
            f"N = max(C × "
            f"{args.requests_per_stream}, {args.min_requests}) requests per level; "
            f"{args.warmup} warm-up requests; {args.repeats} repeats; "
            f"stream starts staggered over {args.stagger:g} s"
        ),
        "prompt": args.prompt,
        "servers": {},
    }
    runs: list[RunSummary] = []
    if args.url:
        meta["servers"]["external"] = args.url
        for rep in range(args.repeats):
            runs += run_levels("external", workload, args, rep, None)
    else:
        runs = _managed(args, workload, meta, out)
    meta["load average after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    path = report.write(out, meta, runs, "concurrent streams" if not args.rate else "level")
    sys.stdout.write(path.read_text())
    log.info("wrote %s", out)
    return 0


def _managed(
    args: argparse.Namespace, workload: loadgen.Workload, meta: dict[str, Any], out: Path
) -> list[RunSummary]:
    from llm_api.services.llm.registry import builtin_registry

    gguf = args.gguf or builtin_registry().models[0].gguf_path()
    meta["model file"] = f"{gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)"
    specs: list[servers.ServerSpec] = []
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in names:
        if name == "llm-api":
            specs.append(
                servers.ours(
                    gguf,
                    threads=args.threads,
                    slots=args.slots,
                    ctx=args.ctx,
                    workdir=out,
                    prefix_cache=args.prefix_cache,
                )
            )
        elif name == "llama-server":
            from bench.serving.llama_server_build import ensure_llama_server

            binary = ensure_llama_server()
            specs.append(
                servers.llama_server(
                    binary, gguf, threads=args.threads, slots=args.slots, ctx=args.ctx
                )
            )
        elif name == "llama-cpp-python":
            specs.append(
                servers.llama_cpp_python(
                    gguf, threads=args.threads, ctx=args.ctx, python=args.lcp_python
                )
            )
        else:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join(ALL_SERVERS)}")
    for spec in specs:
        meta["servers"][spec.name] = spec.flags
    runs: list[RunSummary] = []
    # Repeats interleave the servers, so slow drift in background load hits all of them alike.
    for rep in range(args.repeats):
        for spec in specs:
            server = servers.Running(spec, out / f"{spec.name}-{rep}.log")
            try:
                server.wait_ready()
                w = loadgen.Workload(**{**workload.__dict__, "base_url": spec.base_url})
                runs += run_levels(spec.name, w, args, rep, server)
            finally:
                server.stop()
    return runs
