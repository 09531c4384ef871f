"""A response's head leaves with its first body bytes (api/fastpath/http.HeadHeld): a uvicorn
server in this process, with llm-api's protocol, whose transports record every write. Real
sockets, a raw HTTP client; the app is a small ASGI app whose responses are shaped like
llm-api's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.responses import JSONResponse

from llm_api.api.fastpath import FinalFrame, StreamResponse
from llm_api.api.fastpath.http import OneWriteProtocol
from llm_api.http_server import server_options
from tests.conftest import free_port

WRITES: list[tuple[float, bytes]] = []  # (when, what) for every write to a socket


class _Recording:
    """A transport that records what is written (one entry per write or writelines call)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append((time.monotonic(), bytes(data)))
        self._transport.write(data)

    def writelines(self, parts: Any) -> None:
        parts = [bytes(p) for p in parts]
        WRITES.append((time.monotonic(), b"".join(parts)))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RecordingProtocol(OneWriteProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Recording(transport))  # type: ignore[arg-type]


async def frames() -> AsyncIterator[bytes]:
    yield b'data: {"n":1}\n\n'
    await asyncio.sleep(0.05)
    yield FinalFrame(b'data: {"n":2}\n\ndata: [DONE]\n\n')


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/json":
        await JSONResponse({"ok": True})(scope, receive, send)
    elif path == "/stream":
        response = StreamResponse(frames(), media_type="text/event-stream")
        await response(scope, receive, send)
    elif path == "/slow-body":  # the head, then nothing for a while
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"late"})
    elif path == "/echo":  # reads the body: a client that sent `Expect: 100-continue` waits
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
async def port() -> AsyncIterator[int]:
    options = {**server_options(fast_path=True), "http": RecordingProtocol}
    config = uvicorn.Config(app, port=free_port(), log_level="warning", lifespan="off", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield config.port
    server.should_exit = True
    await task


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 10)  # Connection: close
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return data


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def test_a_json_response_is_one_write(port: int) -> None:
    WRITES.clear()
    response = await exchange(port, get("/json"))
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b'{"ok":true}')
    assert [w for _, w in WRITES] == [response]


async def test_a_stream_head_leaves_with_its_first_frame(port: int) -> None:
    WRITES.clear()
    response = await exchange(port, get("/stream"))
    assert response.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    first, second = (w for _, w in WRITES)
    assert first.startswith(b"HTTP/1.1 200") and b'data: {"n":1}' in first
    assert b'data: {"n":2}' in second and first + second == response


async def test_a_head_sent_alone_is_not_held_for_the_body(port: int) -> None:
    """Held until the end of the loop step only: the client has it long before the body."""
    WRITES.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(get("/slow-body"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    waited = time.monotonic() - t0
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200") and rest.endswith(b"late\r\n0\r\n\r\n")
    assert waited < 0.4, waited  # the body comes 0.5 s after the head
    assert len(WRITES) == 2


async def test_expect_100_continue_still_answers_before_the_body(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello\r\n0\r\n\r\n")


async def test_pipelined_requests_keep_their_order(port: int) -> None:
    def kept(path: str) -> bytes:
        return get(path).replace(b"Connection: close", b"Connection: keep-alive")

    response = await exchange(port, kept("/json") + kept("/stream") + get("/json"))
    assert response.count(b"HTTP/1.1 200") == 3
    first, second, third = response.split(b"HTTP/1.1 200")[1:]
    assert b'{"ok":true}' in first and b"data: [DONE]" in second and b'{"ok":true}' in third
