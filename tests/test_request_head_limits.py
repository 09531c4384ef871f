"""Oversized request heads (a 1 MB header, 10,000 headers, a 1 MB URL) get a fast 431 in the
OpenAI error shape from the live server (`llm-api serve`, uvicorn + httptools), and the app
never sees them; ordinary requests, large bodies and keep-alive are unaffected."""

from __future__ import annotations

import contextlib
import socket
import time

import orjson

from llm_api.http_server import MAX_HEAD_BYTES, MAX_HEADERS
from tests.conftest import LiveServer


def exchange(port: int, raw: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send raw bytes; return everything the server sent until it closed (or went quiet)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # The server may answer and close before we finish sending.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(raw)
        chunks = []
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - t0


def request(
    path: str = "/v1/models", headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{'POST' if body else 'GET'} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def assert_431(response: bytes, seconds: float) -> None:
    status, body = status_and_body(response)
    assert status == 431, response[:300]
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert error["type"] == "invalid_request_error"
    assert seconds < 5, seconds


def test_one_huge_header(live_server: LiveServer) -> None:
    assert_431(*exchange(live_server.port, request(headers=[("X-Big", "a" * 1_000_000)])))


def test_ten_thousand_headers(live_server: LiveServer) -> None:
    many = [(f"X-H{i}", "v") for i in range(10_000)]
    assert_431(*exchange(live_server.port, request(headers=many)))


def test_huge_url(live_server: LiveServer) -> None:
    assert_431(*exchange(live_server.port, request(path="/v1/models?q=" + "a" * 1_000_000)))


def test_unfinished_huge_header_is_cut_before_it_ends(live_server: LiveServer) -> None:
    """A header that never ends is refused once the limit passes, not buffered forever."""
    raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEAD_BYTES)
    assert_431(*exchange(live_server.port, raw))


def test_requests_within_the_limits_are_served(live_server: LiveServer) -> None:
    auth = [("Authorization", f"Bearer {live_server.api_key}")]
    near_limit = [(f"X-H{i}", "v" * 100) for i in range(MAX_HEADERS - 10)]
    status, body = status_and_body(
        exchange(live_server.port, request(headers=auth + near_limit))[0]
    )
    assert status == 200, body[:300]
    assert orjson.loads(body)["object"] == "list"
    # A large body arriving in the same reads as the head is body, not head: no 431.
    big = orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "x" * 500_000}]})
    status, body = status_and_body(
        exchange(live_server.port, request("/v1/chat/completions", auth, big))[0]
    )
    assert status == 404, body[:300]  # reached the app: the model does not exist
    assert orjson.loads(body)["error"]["code"] == "model_not_found"


def test_response_head_names_no_server_software(live_server: LiveServer) -> None:
    """`llm-api serve` runs with http_server.server_options(): no `server: uvicorn` header (it
    would advertise the stack to scanners); the `date` header HTTP asks for stays."""
    response, _ = exchange(live_server.port, request("/health"))
    head = response.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert head[0].startswith(b"http/1.1 200"), head
    names = {line.split(b":", 1)[0] for line in head[1:]}
    assert b"date" in names and b"server" not in names, names
