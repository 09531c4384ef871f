"""The HTTP/1.1 protocol llm-api is served with: uvicorn's httptools protocol with a bounded
request head. `llm-api serve` selects it, and gunicorn through gunicorn_worker.py, both with
`server_options()`.

A bounded request head. uvicorn's httptools protocol parses, buffers and hands to the app a 1 MB
header or 10,000 headers (the attack behind vLLM's CVE-2025-48956); this subclass answers such a
request with 431 and closes the connection before the app sees it (uvicorn's h11 protocol has a
limit, but h11 parses several times slower). A limit, not a speed trick: it applies whether or
not the fast path is on. With the fast path on, api/fastpath/http.py's subclass also writes a
response's head together with its first body bytes.
"""

from __future__ import annotations

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


class HeadLimitedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bounded request head (431 beyond it)."""

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


def server_options(fast_path: bool) -> dict[str, Any]:
    """uvicorn settings shared by `llm-api serve`, gunicorn's worker and the benchmarks that
    profile the server. `fast_path` (LLM_API_FAST_PATH): the protocol that also writes a
    response's head with its first body bytes (api/fastpath/http.py). proxy_headers:
    X-Forwarded-For is handled in the app, trusted only from LLM_API_TRUSTED_PROXIES (uvicorn's
    own default believes any loopback peer, gunicorn's any in forwarded_allow_ips).
    server_header: no `server: uvicorn` advertising the stack on every response (the `date`
    header stays, as HTTP asks of origin servers)."""
    # Imported here: fastpath/http.py subclasses this module's protocol.
    from llm_api.api.fastpath.http import OneWriteProtocol

    return {
        "http": OneWriteProtocol if fast_path else HeadLimitedProtocol,  # both: 431 on big heads
        "proxy_headers": False,
        "server_header": False,
    }
