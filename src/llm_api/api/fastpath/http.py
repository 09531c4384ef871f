"""`OneWriteProtocol`: the server's protocol (http_server.HeadLimitedProtocol), except that a
response's head leaves with its first body bytes.

uvicorn writes the status line and headers to the socket as soon as the app sends
`http.response.start`, and the body in a second write, so every response costs two send() calls
and two TCP segments, and wakes its client twice. On loopback a send() is ~20 µs of kernel time,
~3% of a proxied stream. `HeadHeld` keeps the head until the body's first write or the end of the
loop step, whichever comes first: a head and a body sent back to back (a JSON response; a stream,
whose head fastpath/response.py sends with its first frame ready) leave in one write, and a head
sent alone still leaves a loop step later. tests/test_response_writes.py counts the writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llm_api.http_server import HeadLimitedProtocol


class HeadHeld:
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


class OneWriteProtocol(HeadLimitedProtocol):
    """HeadLimitedProtocol whose responses' heads leave with their first body bytes."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle  # made just now, its task not yet started (or queued, pipelined)
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = HeadHeld(self.transport, self.loop)  # type: ignore[assignment]
