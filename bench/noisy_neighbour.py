"""`python -m bench noisy-neighbour`: what one tenant flooding a model costs another tenant's
time to first token, under first-come-first-served admission and under fair queuing
(services/llm/admission.py, docs/fair-sharing.md). Not bench/neighbour.py, which is about a
busy neighbour *process* on the same CPU.

One run starts our server twice on the built-in model, first with LLM_API_FAIR_QUEUING=false
(FIFO, as before fair queuing), then with fair queuing on (its defaults; a
LLM_API_FAIR_RESERVED_SLOTS in the environment reaches the server).
Against each:
- B alone: tenant B sends one streaming request at a time; its TTFT p50/p95;
- B beside A: tenant A keeps `--a-streams` streams in flight (closed loop, twice the slots by
  default) for `--seconds`, B as before; B's TTFT, and A's output tokens per second;
- B beside a batch: A's key submits a `--batch-lines`-request Batch API job (run by the embedded
  batch worker, `--a-streams` lines at a time) and B's TTFT is measured while it runs; the batch
  is then cancelled (it need not finish for the measurement).
A and B are distinct users (tenants) of the same tier, so their weights are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.serving import loadgen, servers
from bench.serving.run import DEFAULT_PROMPT
from bench.serving.stats import percentile

log = logging.getLogger("bench.noisy_neighbour")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench noisy-neighbour", description=__doc__)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--a-streams", type=int, default=32, help="tenant A's streams in flight")
    p.add_argument("--a-max-tokens", type=int, default=32)
    p.add_argument("--b-max-tokens", type=int, default=4)
    p.add_argument("--b-alone", type=int, default=20, help="B's requests measured alone")
    p.add_argument("--seconds", type=float, default=25.0, help="length of each loaded phase")
    p.add_argument("--batch-lines", type=int, default=500)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--modes", default="fifo,fair", help="admission policies to compare, in this order"
    )
    p.add_argument("--skip-batch", action="store_true", help="leave out the batch variant")
    p.add_argument("--out", type=Path, help="output directory (default bench/out/<timestamp>)")
    return p.parse_args(argv)


def make_key(env: dict[str, str], email: str) -> str:
    """A user and an API key made with the real CLI against the server's database."""
    cli = [sys.executable, "-m", "llm_api.cli"]
    full = {**os.environ, **env}
    subprocess.run(
        [*cli, "users", "create", email, "--tier", "free", "--password-stdin"],
        env=full,
        input=b"pw-" + uuid.uuid4().hex.encode() + b"\n",
        capture_output=True,
        check=True,
    )
    out = subprocess.run(
        [*cli, "keys", "create", email], env=full, check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Phase:
    b_ttft_ms: list[float]
    a_tok_s: float | None = None
    a_requests: int = 0
    failures: int = 0


async def b_sequential(w: loadgen.Workload, count: int | None, until: float | None) -> Phase:
    """Tenant B: one streaming request at a time, `count` of them or until `until`."""
    ttfts: list[float] = []
    failures = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=w.timeout)) as session:
        i = 0
        while (count is None or i < count) and (until is None or time.perf_counter() < until):
            res = await loadgen.one_request(session, w, seed=50_000 + i)
            i += 1
            if res.ok:
                ttfts.append(res.ttft * 1000)
            else:
                failures += 1
                log.warning("B failed: %s", res.error)
    return Phase(ttfts, failures=failures)


async def a_stream(
    session: aiohttp.ClientSession, w: loadgen.Workload, seed: int, chunks: list[float]
) -> bool:
    """One of A's streams; appends each content chunk's arrival to `chunks` as it comes (so a
    stream cut at the end of the window still counts what it delivered within it)."""
    headers = {"Authorization": f"Bearer {w.api_key}"}
    url = f"{w.base_url}/chat/completions"
    async with session.post(url, json=w.body(seed), headers=headers) as resp:
        if resp.status != 200:
            log.warning("A failed: HTTP %s", resp.status)
            return False
        async for raw in resp.content:
            line = raw.strip()
            if line == b"data: [DONE]":
                break
            if line.startswith(b"data:"):
                for choice in json.loads(line[5:]).get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks.append(time.perf_counter())
    return True


async def with_flood(
    a: loadgen.Workload, b: loadgen.Workload, streams: int, seconds: float
) -> Phase:
    """A's closed loop of `streams` streams and B's sequential requests, for `seconds` after
    A has filled the server. A's throughput: its content chunks (one per token from our server)
    that arrived within B's window, per second."""
    chunks: list[float] = []
    done = [0, 0]  # A's requests completed, failed

    async def a_worker(session: aiohttp.ClientSession, k: int) -> None:
        await asyncio.sleep(k * 0.02)  # staggered, as independent streams would be
        n = 0
        while True:
            try:
                ok = await a_stream(session, a, k * 10_000 + n, chunks)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("A failed: %s", exc)
                ok = False
            done[0 if ok else 1] += 1
            n += 1

    conn = aiohttp.TCPConnector(limit=streams + 8, force_close=True)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=a.timeout)
    ) as session:
        workers = [asyncio.create_task(a_worker(session, k)) for k in range(streams)]
        await asyncio.sleep(3.0)  # A's streams fill the slots and the queue
        start = time.perf_counter()
        phase = await b_sequential(b, None, start + seconds)
        end = time.perf_counter()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    phase.a_tok_s = sum(start <= t <= end for t in chunks) / (end - start)
    phase.a_requests, phase.failures = done[0], phase.failures + done[1]
    return phase


async def with_batch(
    base: str, a_key: str, b: loadgen.Workload, lines: int, max_tokens: int, seconds: float
) -> Phase:
    """B's sequential requests while A's Batch API job of `lines` requests runs."""
    body = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": servers.MODEL_ID,
                    "messages": [{"role": "user", "content": f"Request {i}. {DEFAULT_PROMPT}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "ignore_eos": True,
                },
            }
        )
        + "\n"
        for i in range(lines)
    )
    headers = {"Authorization": f"Bearer {a_key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", io.BytesIO(body.encode()), filename="batch.jsonl")
        async with http.post(f"{base}/files", data=form) as r:
            r.raise_for_status()
            file_id = (await r.json())["id"]
        spec = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        async with http.post(f"{base}/batches", json={**spec, "completion_window": "24h"}) as r:
            r.raise_for_status()
            batch_id = (await r.json())["id"]
        # Wait until the batch's lines hold the model (its first results are being written).
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            async with http.get(f"{base}/batches/{batch_id}") as r:
                if (await r.json())["status"] == "in_progress":
                    break
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        phase = await b_sequential(b, None, time.perf_counter() + seconds)
        async with http.get(f"{base}/batches/{batch_id}") as r:
            counts = (await r.json()).get("request_counts") or {}
        phase.a_requests = int(counts.get("completed", 0))
        async with http.post(f"{base}/batches/{batch_id}/cancel") as r:
            r.raise_for_status()
    return phase


def run_mode(mode: str, args: argparse.Namespace, gguf: Path, out: Path) -> dict[str, Phase]:
    workdir = out / mode
    workdir.mkdir(parents=True, exist_ok=True)
    spec = servers.ours(gguf, threads=args.threads, slots=args.slots, ctx=1024, workdir=workdir)
    spec.env.update(
        {
            "LLM_API_AUTH_ENABLED": "true",
            "LLM_API_RATE_LIMIT_ENABLED": "false",  # the gate alone decides who goes next
            "LLM_API_FAIR_QUEUING": "true" if mode == "fair" else "false",
            "LLM_API_BATCH_CONCURRENCY": str(min(args.a_streams, 64)),
            "LLM_API_BATCH_EMBEDDED_WORKER": "true",
        }
    )
    registry = workdir / "bench-models.yaml"  # a queue deep enough for A's streams
    registry.write_text(
        registry.read_text().replace(
            f"max_queue: {max(64, args.slots * 8)}", f"max_queue: {max(64, args.a_streams * 4)}"
        )
    )
    a_key = make_key(spec.env, f"tenant-a-{mode}@example.com")
    b_key = make_key(spec.env, f"tenant-b-{mode}@example.com")
    server = servers.Running(spec, workdir / "server.log")
    phases: dict[str, Phase] = {}
    try:
        server.wait_ready()

        def workload(key: str, max_tokens: int, prompt: str) -> loadgen.Workload:
            return loadgen.Workload(
                base_url=spec.base_url,
                model=servers.MODEL_ID,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.7,
                ignore_eos=True,
                api_key=key,
            )

        a = workload(a_key, args.a_max_tokens, DEFAULT_PROMPT)
        b = workload(b_key, args.b_max_tokens, "Say hello to the lighthouse keeper.")
        asyncio.run(b_sequential(b, 3, None))  # warm-up
        phases["alone"] = asyncio.run(b_sequential(b, args.b_alone, None))
        log.info("%s: B alone %s", mode, _ms(phases["alone"]))
        phases["flood"] = asyncio.run(with_flood(a, b, args.a_streams, args.seconds))
        log.info("%s: B beside A %s, A %.1f tok/s", mode, _ms(phases["flood"]),
                 phases["flood"].a_tok_s)  # fmt: skip
        if not args.skip_batch:
            phases["batch"] = asyncio.run(
                with_batch(
                    spec.base_url, a_key, b, args.batch_lines, args.a_max_tokens, args.seconds
                )
            )
            log.info("%s: B beside a batch %s", mode, _ms(phases["batch"]))
    finally:
        server.stop()
    return phases


def _ms(p: Phase) -> str:
    if not p.b_ttft_ms:
        return "no successful requests"
    return (
        f"TTFT p50 {percentile(p.b_ttft_ms, 50):.0f} ms, p95 {percentile(p.b_ttft_ms, 95):.0f} ms"
        f" (n={len(p.b_ttft_ms)}, failed {p.failures})"
    )


def report(args: argparse.Namespace, results: dict[str, dict[str, Phase]], argv: list[str]) -> str:
    lines = [
        f"# Noisy neighbour: A = {args.a_streams} streams (max_tokens {args.a_max_tokens}), "
        f"B = one request at a time (max_tokens {args.b_max_tokens}), {args.slots} slots, "
        f"{args.threads} threads, {os.cpu_count()} CPUs",
        "",
        "Command: `python -m bench noisy-neighbour " + " ".join(argv) + "`",
        "",
        "| admission | B alone p50 / p95 (ms) | B beside A p50 / p95 (ms) | p95 vs alone "
        "| A tok/s (requests) | B beside batch p50 / p95 (ms) | p95 vs alone | batch lines done |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, phases in results.items():
        alone = phases["alone"].b_ttft_ms
        cells = [mode, _pair(alone)]
        for name in ("flood", "batch"):
            phase = phases.get(name)
            if phase is None or not phase.b_ttft_ms:
                cells += ["–", "–"]
            else:
                ratio = percentile(phase.b_ttft_ms, 95) / percentile(alone, 95)
                cells += [_pair(phase.b_ttft_ms) + f" (n={len(phase.b_ttft_ms)})", f"{ratio:.2f}×"]
            if name == "flood" and phase is not None:
                cells.append(f"{phase.a_tok_s:.1f} ({phase.a_requests})")
            elif name == "batch":
                cells.append(str(phase.a_requests) if phase is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if "fifo" in results and "fair" in results:
        fifo, fair = results["fifo"]["flood"].a_tok_s, results["fair"]["flood"].a_tok_s
        if fifo and fair:
            lines += ["", f"A's throughput under fair queuing: {fair / fifo:.2f}× FIFO's."]
    return "\n".join(lines) + "\n"


def _pair(values: list[float]) -> str:
    return f"{percentile(values, 50):.0f} / {percentile(values, 95):.0f}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = args.out or Path("bench/out") / time.strftime("noisy-neighbour-%Y-%m-%dT%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    from llm_api.services.llm.registry import builtin_registry

    gguf = builtin_registry().models[0].gguf_path()
    results = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results[mode] = run_mode(mode, args, gguf, out)
    text = report(args, results, argv)
    (out / "noisy-neighbour.md").write_text(text)
    print(text)
    return 0
