"""Warm start and graceful drain: /ready during warm-up, SIGTERM with open streams against a real
uvicorn process, and the drain's cut + on_drain hooks in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from llm_api.services.llm.registry import DEFAULT_MODEL_ID
from tests.conftest import create_account
from tests.ops.conftest import Spawned, ops_app, wait_ready

pytestmark = pytest.mark.model
MODEL = DEFAULT_MODEL_ID
LONG = {  # output long enough that it is still running when the drain deadline passes
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
    "max_tokens": 2000,
    "temperature": 0,
    "stream": True,
}


def data_events(body: str) -> list[str]:
    return [line[6:] for line in body.split("\n") if line.startswith("data: ")]


def outcome(status: int, body: str) -> str:
    """completed | cut (error event, then [DONE]) | refused (503 before it began)."""
    if status == 503:
        assert json.loads(body)["error"]["code"] == "service_unavailable"
        return "refused"
    assert status == 200, body
    events = data_events(body)
    assert events[-1] == "[DONE]", body[-500:]
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["code"] == "service_unavailable"
        assert last["error"]["message"]
        return "cut"
    assert any(c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"])
    return "completed"


async def test_ready_only_after_models_warm_up(tmp_path: Path) -> None:
    app = ops_app(tmp_path)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            # The lifespan has just started the model load in the background.
            health, ready = await c.get("/health"), await c.get("/ready")
            assert health.status_code == 200 and health.json()["llm_service"] is False
            assert ready.status_code == 503 and ready.json() == {"status": "loading"}
            assert ready.headers["retry-after"]
            await wait_ready(app)
            assert (await c.get("/ready")).json() == {"status": "ready"}
            assert (await c.get("/health")).json()["llm_service"] is True


async def test_drain_cuts_inflight_stream_then_runs_hooks(tmp_path: Path) -> None:
    app = ops_app(tmp_path, drain_timeout=0.2)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        await wait_ready(app)
        user = await create_account(app)
        state = app.state.llm_api
        seen: list[tuple[str, int]] = []

        async def flush() -> None:
            seen.append(("flushed", len(state.drainer.inflight)))

        state.on_drain.append(flush)
        first_body = asyncio.Event()

        async def watched(scope: Any, receive: Any, send: Any) -> None:
            async def send_watched(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    first_body.set()

            await app(scope, receive, send_watched)

        transport = httpx.ASGITransport(app=watched)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=user.headers, timeout=120
        ) as c:
            # httpx's ASGI transport returns a response only once it has ended, so the stream
            # runs as a task; the drain starts once its first frame has gone out.
            stream = asyncio.create_task(c.post("/v1/chat/completions", json=LONG))
            await asyncio.wait_for(first_body.wait(), 120)
            drain = asyncio.create_task(state.drainer.drain())
            await asyncio.sleep(0.05)
            assert (await c.get("/ready")).status_code == 503
            refused = await c.post("/v1/chat/completions", json={**LONG, "stream": False})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            assert refused.json()["error"]["type"] == "server_error"
            resp = await stream
            await drain
        assert outcome(resp.status_code, resp.text) == "cut"
        assert seen == [("flushed", 0)]  # hooks ran once, after the stream had ended
        assert state.llm.gates[MODEL].running == 0  # the cut freed the model's slot


async def _stream(client: httpx.AsyncClient, started: asyncio.Event) -> tuple[int, str]:
    async with client.stream("POST", "/v1/chat/completions", json=LONG) as resp:
        parts: list[str] = []
        async for text in resp.aiter_text():
            parts.append(text)
            if "data: " in text:
                started.set()
        return resp.status_code, "".join(parts)


async def test_sigterm_with_ten_open_streams(tmp_path: Path) -> None:
    drain_timeout = 4.0
    server = Spawned(tmp_path, {"LLM_API_DRAIN_TIMEOUT": str(drain_timeout)})
    try:
        await asyncio.to_thread(server.wait_ready)
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=httpx.Timeout(120), limits=limits
        ) as c:
            started = [asyncio.Event() for _ in range(10)]
            streams = [asyncio.create_task(_stream(c, ev)) for ev in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)

            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            await asyncio.sleep(0.2)
            assert (await c.get("/ready")).status_code == 503  # at once, socket still open
            late = await c.post("/v1/chat/completions", json={**LONG, "stream": False})
            assert late.status_code == 503 and late.headers["retry-after"] == "5"

            results: list[Any] = await asyncio.wait_for(asyncio.gather(*streams), 60)
        outcomes = [outcome(status, body) for status, body in results]
        assert len(outcomes) == 10
        assert set(outcomes) <= {"completed", "cut"}, outcomes
        assert "cut" in outcomes  # 2000 tokens each cannot finish in 4 s on this machine

        rc = await asyncio.to_thread(server.proc.wait, drain_timeout + 30)
        elapsed = time.monotonic() - t0
        assert rc in (0, -signal.SIGTERM), server.log()[-3000:]
        assert elapsed < drain_timeout + 10, elapsed  # drain timeout plus a margin
        records = server.json_log()
        events = [r.get("event") for r in records]
        assert "drain_started" in events and "drain_finished" in events
        access = [r for r in records if r.get("logger") == "llm_api.access"]
        chat = [r for r in access if r["path"] == "/v1/chat/completions"]
        assert len(chat) == 11  # the 10 streams (logged at their end) and the refused one
        assert sum(1 for r in chat if r.get("drain_cut")) == outcomes.count("cut")
        # Every stream's access line came before the drain finished (usage hooks run then).
        finished = events.index("drain_finished")
        assert all(records.index(r) < finished for r in chat)
        # Usage was flushed before exit: one row per stream, cut ones with their partial tokens,
        # and the same ids and counts as the access log.
        with contextlib.closing(sqlite3.connect(tmp_path / "llm-api.db")) as db:
            rows = dict(
                db.execute("SELECT request_id, completion_tokens FROM usage_records").fetchall()
            )
        streamed = {r["generation_id"]: r["completion_tokens"] for r in chat if r["status"] == 200}
        assert len(streamed) == 10
        assert rows == streamed
        # The server's cut is told apart from a client leaving: 503, not a 499 disconnect.
        with contextlib.closing(sqlite3.connect(tmp_path / "llm-api.db")) as db:
            outcome_of = {
                rid: (status, disconnected)
                for rid, status, disconnected in db.execute(
                    "SELECT request_id, status, disconnected FROM usage_records"
                )
            }
        cut_ids = {r["generation_id"] for r in chat if r.get("drain_cut")}
        assert cut_ids and all(outcome_of[rid] == (503, 0) for rid in cut_ids), outcome_of
        assert all(outcome_of[rid] == (200, 0) for rid in streamed.keys() - cut_ids)
    finally:
        server.stop()
