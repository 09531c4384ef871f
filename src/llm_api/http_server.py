"""The HTTP/1.1 protocol llm-api is served with: uvicorn's httptools protocol, plus two things
uvicorn has no setting for. `llm-api serve` selects it, and gunicorn through gunicorn_worker.py,
both with `SERVER_OPTIONS`.

A bounded request head. uvicorn's httptools protocol parses, buffers and hands to the app a 1 MB
header or 10,000 headers (the attack behind vLLM's CVE-2025-48956); this subclass answers such a
request with 431 and closes the connection before the app sees it (uvicorn's h11 protocol has a
limit, but h11 parses several times slower).

A response's head leaves with its first body bytes. uvicorn writes the status line and headers
to the socket as soon as the app sends `http.response.start`, and the body in a second write, so
every response costs two send() calls and two TCP segments, and wakes its client twice. On
loopback a send() is ~20 µs of kernel time, ~3% of a proxied stream. `_HeadHeld` keeps the head
until the body's first write or the end of the loop step, whichever comes first: a head and a
body sent back to back (a JSON response; a stream, whose head `api/streaming` sends with its
first frame ready) leave in one write, and a head sent alone still leaves a loop step later.
tests/test_response_writes.py counts the writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; nginx's default allows 32 KB
MAX_HEADERS = 200

_BODY = orjson.dumps(
    {
        "error": {
            "message": (
                f"Request headers are too large (at most {MAX_HEADERS} headers and "
                f"{MAX_HEAD_BYTES // 1024} KiB in all)."
            ),
            "type": "invalid_request_error",
            "param": None,
            "code": "request_header_fields_too_large",
        }
    }
)


class _HeadTooLarge(Exception):
    pass


class _HeadHeld:
    """The transport as one request/response cycle sees it: its first write (the response head,
    or a `100 Continue`) is held until its next write or the end of the loop step; everything
    else passes straight through."""

    __slots__ = ("_transport", "_loop", "_held", "_flush_handle")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None  # set by the first write

    def write(self, data: bytes) -> None:
        if self._flush_handle is None:  # the first write
            self._held = data
            self._flush_handle = self._loop.call_soon(self._flush)
            return
        held = self._held
        if held is None:
            self._transport.write(data)
            return
        self._held = None
        self._flush_handle.cancel()
        self._transport.writelines((held, data))  # one send() (writev), no copy of the body

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadLimitedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bounded request head (431 beyond it), whose responses' heads
    leave with their first body bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # complete url/header bytes of the current request
        self._head_count = 0
        self._pending = 0  # bytes received while the head was still incomplete
        self._in_head = True
        self._too_large = False

    def on_message_begin(self) -> None:
        self._head_bytes = self._head_count = self._pending = 0
        self._in_head = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        cycle = self.cycle  # made just now, its task not yet started (or queued, pipelined)
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = _HeadHeld(self.transport, self.loop)  # type: ignore[assignment]

    def _count(self, size: int, headers: int) -> None:
        self._head_bytes += size
        self._head_count += headers
        if self._head_bytes > MAX_HEAD_BYTES or self._head_count > MAX_HEADERS:
            self._too_large = True
            raise _HeadTooLarge  # httptools turns it into a parser error: data_received stops

    def data_received(self, data: bytes) -> None:
        if self._too_large:
            return
        super().data_received(data)
        if self._in_head and not self._too_large:
            # One header still arriving (httptools buffers it until it ends): every byte of
            # this read was head, so the total bounds the buffering.
            self._pending += len(data)
            if self._pending > MAX_HEAD_BYTES:
                self._too_large = True
                self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        self.logger.warning("Request head too large: refused with 431.")
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(_BODY)
        )
        self.transport.write(b"".join(head) + _BODY)
        self.transport.close()


# uvicorn settings shared by `llm-api serve`, gunicorn's worker and the benchmarks that profile
# the server. proxy_headers: X-Forwarded-For is handled in the app, trusted only from
# LLM_API_TRUSTED_PROXIES (uvicorn's own default believes any loopback peer, gunicorn's any in
# forwarded_allow_ips). server_header: no `server: uvicorn` advertising the stack on every
# response (the `date` header stays, as HTTP asks of origin servers).
SERVER_OPTIONS: dict[str, Any] = {
    "http": HeadLimitedProtocol,  # 431 for oversized request heads
    "proxy_headers": False,
    "server_header": False,
}
