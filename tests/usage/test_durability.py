"""Usage records are never lost (issue 5, points 4 and 6): PostgreSQL cut off for 10 s under
load (through a TCP proxy we close and reopen, never the shared cluster), SIGTERM and SIGKILL of
a live server with records pending, a cancelled stream's partial tokens, and replays that never
count a request twice."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from llm_api.services.usage.buffer import DurableBuffer
from tests.conftest import LiveServer, postgres_database, require_service, start_live_server
from tests.usage.conftest import PG_HOST, PG_PORT, TcpProxy, chat_body, nonce, running_app

pytestmark = pytest.mark.model

LIVE_ENV = {
    "LLM_API_AUTH_ENABLED": "false",  # loopback only; these tests are about the records
    "LLM_API_LLAMA_THREADS": "1",
    "LLM_API_LOG_LEVEL": "WARNING",
}
PENDING_ENV = {**LIVE_ENV, "LLM_API_USAGE_FLUSH_INTERVAL_SECONDS": "3600"}  # records stay buffered
FLUSHING_ENV = {**LIVE_ENV, "LLM_API_USAGE_FLUSH_INTERVAL_SECONDS": "0.2"}


def request_id(body: dict[str, Any]) -> str:
    return str(body["id"]).split("-", 1)[1]


def db_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    path = data_dir / "llm-api.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        try:
            return conn.execute(
                "SELECT request_id, status, disconnected, prompt_tokens, completion_tokens "
                "FROM usage_records"
            ).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


def buffered_ids(data_dir: Path) -> list[str]:
    ids = []
    for path in (data_dir / "buffer" / "usage").glob("*"):
        for line in path.read_bytes().splitlines():
            ids.append(orjson.loads(line)["request_id"])
    return ids


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def send_requests(server: LiveServer, count: int) -> set[str]:
    ids = set()
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for i in range(count):
            body = chat_body(f"Say a word {nonce()} {i}")
            resp = http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            ids.add(request_id(resp.json()))
    return ids


# --- process death ------------------------------------------------------------------------------


def test_sigkill_with_records_pending_loses_nothing(tmp_path: Path) -> None:
    server = start_live_server(tmp_path, env=PENDING_ENV)
    try:
        ids = send_requests(server, 5)
        assert sorted(buffered_ids(tmp_path)) == sorted(ids)  # on disk, not in the database
        assert not db_rows(tmp_path)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
    finally:
        server.stop()
    restarted = start_live_server(tmp_path, env=FLUSHING_ENV)
    try:
        wait_for(lambda: len(db_rows(tmp_path)) >= len(ids))
        more = send_requests(restarted, 1)
        wait_for(lambda: len(db_rows(tmp_path)) >= len(ids) + 1)
    finally:
        restarted.stop()
    rows = db_rows(tmp_path)
    assert sorted(r[0] for r in rows) == sorted(ids | more)  # each exactly once
    assert buffered_ids(tmp_path) == []


def test_sigterm_flushes_pending_records_before_exit(tmp_path: Path) -> None:
    server = start_live_server(tmp_path, env=PENDING_ENV)
    try:
        ids = send_requests(server, 4)
        assert not db_rows(tmp_path)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        server.stop()
    assert sorted(r[0] for r in db_rows(tmp_path)) == sorted(ids)  # written during the drain
    assert buffered_ids(tmp_path) == []
    restarted = start_live_server(tmp_path, env=FLUSHING_ENV)  # a restart adds no duplicates
    try:
        time.sleep(1.0)
    finally:
        restarted.stop()
    assert sorted(r[0] for r in db_rows(tmp_path)) == sorted(ids)


def test_cancelled_stream_records_its_partial_tokens(tmp_path: Path) -> None:
    server = start_live_server(tmp_path, env=FLUSHING_ENV)
    try:
        body = chat_body(
            f"Write a very long story about a lighthouse keeper {nonce()}",
            max_tokens=400,
            stop=None,
            stream=True,
        )
        seen, rid = 0, None
        with (
            httpx.Client(base_url=server.base_url, timeout=120) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                rid = request_id(chunk)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    seen += 1
                if seen >= 5:
                    break  # leaving the block closes the connection mid-stream
        assert rid is not None
        wait_for(lambda: any(r[0] == rid for r in db_rows(tmp_path)), timeout=30)
    finally:
        server.stop()
    (row,) = [r for r in db_rows(tmp_path) if r[0] == rid]
    _, status, disconnected, prompt_tokens, completion_tokens = row
    assert status == 499 and disconnected == 1
    assert prompt_tokens > 0
    assert 5 <= completion_tokens < 400  # what was generated before the disconnect


# --- database outage ----------------------------------------------------------------------------


async def test_postgres_unreachable_for_10s_under_load(tmp_path: Path) -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    async with postgres_database() as url:
        proxy = TcpProxy(PG_PORT)
        await proxy.open()
        proxied = url.replace(f":{PG_PORT}/", f":{proxy.port}/")
        async with running_app(
            tmp_path,
            database_url=proxied,
            db_auto_migrate=True,
            auth_enabled=False,
            usage_max_backoff_seconds=1.0,
        ) as env:
            ids: list[str] = []
            topic = nonce()

            async def load(worker: int, seconds: float) -> None:
                stop_at = time.monotonic() + seconds
                n = 0
                while time.monotonic() < stop_at:
                    n += 1  # a third of the prompts repeat: cache hits are recorded too
                    prompt = f"Say a word {topic} {worker} {n if n % 3 else 0}"
                    resp = await env.http.post("/v1/chat/completions", json=chat_body(prompt))
                    assert resp.status_code == 200, resp.text
                    ids.append(request_id(resp.json()))

            await asyncio.gather(*(load(w, 2) for w in range(3)))
            await proxy.close()  # PostgreSQL is now unreachable
            before_outage = len(ids)
            await asyncio.gather(*(load(w, 10) for w in range(3)))
            assert env.state.usage.flusher.failures > 0  # the flusher really was cut off
            assert len(ids) - before_outage >= 6
            await proxy.open()
            await asyncio.gather(*(load(w, 2) for w in range(3)))

            deadline = time.monotonic() + 60
            while await _count(env) < len(ids):
                assert time.monotonic() < deadline, "records did not arrive"
                await asyncio.sleep(0.3)
            records = await env.records()
        await proxy.close()
    assert len(ids) == len(set(ids))
    assert sorted(r.request_id for r in records) == sorted(ids)  # every one, exactly once
    assert any(r.cache_hit for r in records)


async def _count(env: Any) -> int:
    try:
        return int(await env.record_count())
    except Exception:  # the pool may still hold a connection the proxy cut
        return -1


# --- the buffer itself --------------------------------------------------------------------------


async def test_replaying_a_flushed_segment_counts_nothing_twice(tmp_path: Path) -> None:
    async with running_app(tmp_path, auth_enabled=False) as env:
        resp = await env.http.post("/v1/chat/completions", json=chat_body(f"Hi {nonce()}"))
        rid = request_id(resp.json())
        buffer: DurableBuffer = env.state.usage.buffer
        await buffer.rotate()
        (segment,) = buffer.closed_segments()
        copy = tmp_path / "copy.jsonl"
        shutil.copy(segment, copy)
        await env.flush()
        # As if the process died after the insert but before deleting the file, twice over.
        shutil.copy(copy, segment)
        shutil.copy(copy, segment.with_name("other-" + segment.name))
        await env.flush()
        records = await env.records()
        assert [r.request_id for r in records] == [rid]


async def test_dead_process_segment_is_recovered_and_torn_lines_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "buffer"
    directory.mkdir()
    orphan = directory / "12345-deadbeef-000001.open"  # no process holds its lock
    good = {"kind": "usage", "request_id": "r1"}
    orphan.write_bytes(orjson.dumps(good) + b"\n" + b'{"kind": "usage", "requ')
    buffer = DurableBuffer(directory)
    buffer.append({"kind": "usage", "request_id": "mine"})  # our own open segment is left alone
    segments = buffer.closed_segments()
    assert [s.name for s in segments] == ["12345-deadbeef-000001.jsonl"]
    assert DurableBuffer.read_segment(segments[0]) == [good]
    other = DurableBuffer(directory)  # another live process: cannot take our open segment
    assert [s.name for s in other.closed_segments()] == ["12345-deadbeef-000001.jsonl"]
    await buffer.close()
    await other.close()
    assert os.path.exists(directory)
