"""`python -m bench neighbour`: what one busy neighbour process costs local inference.

Containers and shared hosts always have neighbours. llama.cpp's CPU backend is built with
OpenMP here, and libgomp's default is to spin ~3 ms at every barrier before it sleeps: with a
neighbour on the same cores, a spinning thread keeps the core while the thread it waits for is
descheduled, and throughput falls far below a fair share. Sleeping at once (GOMP_SPINCOUNT=0,
i.e. OMP_WAIT_POLICY=PASSIVE) costs half the throughput when alone. llm-api spins ~10 µs
(GOMP_SPINCOUNT=1000, services/llm/__init__.py). This benchmark runs the server with several
spin counts (`server` = its own default), each alone and next to busy-loop processes, in the
same run, and reports tokens/s and the share kept.

A fair share on N cores with T inference threads and one neighbour is T / (T + 1) of the CPU
while all are runnable (2/3 on this 2-core host with 2 threads).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.serving import loadgen, servers
from bench.serving.run import DEFAULT_PROMPT
from bench.serving.stats import summarise

log = logging.getLogger("bench.neighbour")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench neighbour", description=__doc__)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=16, help="per measurement")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--neighbours", type=int, default=1, help="busy-loop processes")
    p.add_argument(
        "--spincounts",
        default="server,0,300000",
        help="GOMP_SPINCOUNT values to compare; `server` = the server's own default",
    )
    p.add_argument("--out", type=Path, help="output directory (default bench/out/<timestamp>)")
    return p.parse_args(argv)


def _tok_s(w: loadgen.Workload, args: argparse.Namespace, label: str) -> float:
    results = asyncio.run(loadgen.closed_loop(w, args.streams, args.requests))
    s = summarise(label, "closed", args.streams, 0, results)
    if s.failures:
        raise SystemExit(f"{label}: {s.failures} failed requests")
    log.info("%s: %.1f tok/s", label, s.output_tok_s)
    return s.output_tok_s


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    args = parse_args(argv)
    out = args.out or Path("bench/out") / time.strftime("neighbour-%Y-%m-%dT%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    from llm_api.services.llm.registry import builtin_registry

    gguf = builtin_registry().models[0].gguf_path()
    rows: list[tuple[str, float, float]] = []
    for policy in [c.strip() for c in args.spincounts.split(",") if c.strip()]:
        spec = servers.ours(gguf, threads=args.threads, slots=16, ctx=1024, workdir=out)
        if policy != "server":
            spec.env["GOMP_SPINCOUNT"] = policy  # 300000 is libgomp's default: ~3 ms
        server = servers.Running(spec, out / f"llm-api-{policy}.log")
        try:
            server.wait_ready()
            w = loadgen.Workload(
                base_url=spec.base_url,
                model=servers.MODEL_ID,
                prompt=DEFAULT_PROMPT,
                max_tokens=args.max_tokens,
                temperature=0.7,
                ignore_eos=True,
                api_key=None,
                same_prompt=False,
            )
            asyncio.run(loadgen.closed_loop(w, 1, 2))  # warm-up
            alone = _tok_s(w, args, f"{policy} alone")
            busy = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.neighbours)
            ]
            try:
                shared = _tok_s(w, args, f"{policy} with {args.neighbours} neighbour(s)")
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
            rows.append((policy, alone, shared))
        finally:
            server.stop()
    fair = args.threads / (args.threads + args.neighbours)
    lines = [
        f"# Busy neighbour: {args.streams} streams, max_tokens {args.max_tokens}, "
        f"{args.threads} threads, {args.neighbours} busy-loop process(es), {os.cpu_count()} CPUs",
        "",
        f"Command: `python -m bench neighbour --streams {args.streams} --requests "
        f"{args.requests} --max-tokens {args.max_tokens} --threads {args.threads} "
        f"--neighbours {args.neighbours} --spincounts {args.spincounts}`",
        "",
        "| OpenMP waits | alone tok/s | with neighbour tok/s | share kept | fair share |",
        "|---|---|---|---|---|",
    ]
    for policy, alone, shared in rows:
        name = {
            "server": "llm-api's default",
            "300000": "GOMP_SPINCOUNT=300000 (libgomp's default, ~3 ms)",
        }.get(policy, f"GOMP_SPINCOUNT={policy}")
        lines.append(f"| {name} | {alone:.1f} | {shared:.1f} | {shared / alone:.0%} | {fair:.0%} |")
    text = "\n".join(lines) + "\n"
    (out / "neighbour.md").write_text(text)
    sys.stdout.write(text)
    return 0
