"""Slow clients cannot make the server hold their responses: a live `llm-api serve`, stub upstreams
sending large answers, and real sockets that stop reading. What the server holds per stalled stream
is bounded in bytes (api/streaming.py, openai_upstream.MAX_READ_BYTES), and the upstream is not
read ahead of the client: backpressure reaches the upstream's socket."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import yaml

from bench.stub_upstream import StubConfig, StubUpstream
from tests.conftest import LiveServer, eventually, start_live_server
from tests.routing_support import stubs

MiB = 1024 * 1024
READERS = 50
# 8 MiB answers in 16 KiB events; and one of 128 MiB, more than every kernel buffer between the
# upstream and the client can hold (a few MiB each way on loopback).
EIGHT = StubConfig(tokens=512, token="x" * 16384)
HUGE = StubConfig(tokens=2048, token="x" * 65536)


def answer(cfg: StubConfig) -> int:
    return cfg.tokens * len(cfg.token)


def rss(server: LiveServer) -> int:
    """The server process's resident memory, in bytes."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def body(model: str, cfg: StubConfig) -> dict[str, object]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": model, "messages": messages, "max_tokens": cfg.tokens, "stream": True}


def finished(server: LiveServer) -> list[int]:
    """The completion tokens of each chat stream the server has finished (its access log)."""
    log = server.log.read_text(errors="replace")
    return [
        int(m.group(1))
        for m in re.finditer(r"completion_tokens=(\d+)[^\n]*path=/v1/chat/completions", log)
    ]


@asynccontextmanager
async def serving(
    tmp_path: Path, cfg: StubConfig
) -> AsyncIterator[tuple[LiveServer, StubUpstream]]:
    async with stubs(cfg) as (up,):
        up.keep_bodies = False
        model = {
            "id": "big",
            "backend": "openai",
            "base_url": up.base_url,
            "concurrency": READERS + 8,
            "max_queue": 8,
        }
        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [model]}))
        env = {
            "LLM_API_MODELS_FILE": str(registry),
            "LLM_API_AUTH_ENABLED": "false",
            "LLM_API_CACHE_ENABLED": "false",
        }
        server = await asyncio.to_thread(start_live_server, tmp_path / "server", env)
        try:
            yield server, up
        finally:
            await asyncio.to_thread(server.stop)


async def stalled_reader(server: LiveServer, cfg: StubConfig) -> asyncio.StreamWriter:
    """A client that reads the response head and its first bytes, then nothing, with a small
    receive buffer (a slow mobile client's window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
    payload = orjson.dumps(body("big", cfg))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    await reader.readexactly(1024)
    writer.transport.pause_reading()  # and no more
    return writer


async def steady(stub: StubUpstream) -> None:
    """Until the upstream's writes stop moving: every stream is held up by its client."""
    last = -1
    while stub.stats.bytes_sent != last:
        last = stub.stats.bytes_sent
        await asyncio.sleep(1.0)


async def test_stalled_clients_hold_bounded_memory(tmp_path: Path) -> None:
    async with serving(tmp_path, EIGHT) as (server, up):
        # A fast client first: the whole 8 MiB arrives (and the server's pools are warm).
        text = 0
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=body("big", EIGHT)) as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    if chunk["choices"]:
                        text += len(chunk["choices"][0]["delta"].get("content") or "")
        assert text == answer(EIGHT)
        before = rss(server)

        writers = [await stalled_reader(server, EIGHT) for _ in range(READERS)]
        await steady(up)
        held = rss(server) - before
        for w in writers:
            w.close()
        await eventually(lambda: len(finished(server)) == READERS + 1, timeout=60)
        after = rss(server) - before
    print(  # noqa: T201 - the figures for the record
        f"\n{READERS} stalled readers of {answer(EIGHT) // MiB} MiB answers: server RSS "
        f"+{held / MiB:.1f} MiB while held, +{after / MiB:.1f} MiB after they left"
    )
    # Up to 64 frames of a whole upstream read each (~12 MiB a stream) before the byte bound.
    assert held < READERS * 1.5 * MiB
    assert after < READERS * 1.5 * MiB


async def test_a_stalled_client_stops_the_upstream(tmp_path: Path) -> None:
    """Backpressure reaches the upstream: a client that stops reading a 128 MiB answer stops the
    server reading it, and so the upstream writing it, once the small buffers between them are
    full (the kernel's, a few MiB each way, and the server's), far from the whole answer."""
    async with serving(tmp_path, HUGE) as (server, up):
        writer = await stalled_reader(server, HUGE)
        await steady(up)
        sent = up.stats.bytes_sent
        writer.close()
        await eventually(lambda: len(finished(server)) == 1, timeout=60)
    [through] = finished(server)  # tokens the server read from the upstream
    print(  # noqa: T201
        f"\nstalled reader of a {answer(HUGE) // MiB} MiB answer: the upstream sent "
        f"{sent / MiB:.1f} MiB, the server passed on {through * len(HUGE.token) / MiB:.1f} MiB"
    )
    # What the server read is what the client's socket buffers took (the kernel's send buffer,
    # 4 MiB at most by default) plus the server's own small bounds; 28 MiB before the byte bound.
    assert through * len(HUGE.token) < 12 * MiB
    assert sent < answer(HUGE) / 2
    assert up.stats.completed == 0 and up.stats.cancelled == 1
