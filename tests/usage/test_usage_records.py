"""Usage records and reports (issue 5, points 2, 3, 5) on SQLite and on the real PostgreSQL:
one record per request (cache hits included), totals equal to the sum of the responses' usage,
own vs admin reports, and the conversation log with opt-out and retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from llm_api.db.tables import Conversation
from tests.conftest import MODEL, eventually, postgres_database, require_service
from tests.usage.conftest import (
    PG_HOST,
    PG_PORT,
    ROOM,
    SHORT,
    Running,
    chat_body,
    nonce,
    running_app,
)

pytestmark = pytest.mark.model


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    overrides: dict[str, Any] = {"conversation_log": True}
    if request.param == "sqlite":
        async with running_app(tmp_path, **overrides) as running:
            yield running
        return
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    async with (
        postgres_database() as url,
        running_app(tmp_path, database_url=url, db_auto_migrate=True, **overrides) as running,
    ):
        yield running


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_generated_request_id_finds_the_usage_record(env: Running) -> None:
    """X-Request-ID that the server generated is the completion id and the usage record's id, so
    a user quoting it can be found; a client's own X-Request-ID is echoed but never becomes a
    record's id (records are idempotent by id: a reused one would drop the second record)."""
    user_id, key = await env.user()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    plain = await env.http.post("/v1/chat/completions", json=body, headers=auth(key))
    assert plain.status_code == 200, plain.text
    generated = plain.headers["x-request-id"]
    assert plain.json()["id"] == f"chatcmpl-{generated}"

    mine = {**auth(key), "X-Request-ID": "client-chosen-id-0001"}
    echoed = []
    for _ in range(2):  # the same client id twice: two requests, two records
        resp = await env.http.post("/v1/chat/completions", json=body, headers=mine)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == "client-chosen-id-0001"
        echoed.append(resp.json()["id"].removeprefix("chatcmpl-"))
    assert len(set(echoed)) == 2 and "client-chosen-id-0001" not in echoed

    await env.flush()
    records = await env.records(user_id=user_id)
    assert sorted(r.request_id for r in records) == sorted([generated, *echoed])


async def test_usage_totals_equal_the_sum_of_the_responses(env: Running) -> None:
    user_id, key = await env.user()
    client = env.client(key)
    topic = nonce()
    expected = {"prompt": 0, "completion": 0}
    ids: set[str] = set()
    for i in range(4):  # two distinct prompts, each asked twice: misses then cache hits
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say a word about the number {i % 2}."}],
            max_tokens=ROOM,
            temperature=0,
            stop=SHORT,
        )
        assert reply.usage is not None
        assert reply.choices[0].finish_reason == "stop"
        expected["prompt"] += reply.usage.prompt_tokens
        expected["completion"] += reply.usage.completion_tokens
        ids.add(reply.id.removeprefix("chatcmpl-"))
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Name an animal {topic}"}],
        max_tokens=ROOM,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        ids.add(chunk.id.removeprefix("chatcmpl-"))
        if chunk.usage:
            expected["prompt"] += chunk.usage.prompt_tokens
            expected["completion"] += chunk.usage.completion_tokens
    completion = await client.completions.create(
        model=MODEL, prompt=f"One two {topic}", max_tokens=4, temperature=0.5
    )
    assert completion.usage is not None
    expected["prompt"] += completion.usage.prompt_tokens
    expected["completion"] += completion.usage.completion_tokens
    ids.add(completion.id.removeprefix("cmpl-"))

    await env.flush()
    records = await env.records(user_id=user_id)
    assert {r.request_id for r in records} == ids and len(records) == 6
    assert sum(r.cache_hit for r in records) == 2
    assert all(r.status == 200 and r.latency_ms >= 0 for r in records)
    assert {r.endpoint for r in records} == {"chat", "completions"}

    resp = await env.http.get("/v1/usage", headers=auth(key))
    assert resp.status_code == 200, resp.text
    report = resp.json()
    totals = report["totals"]
    assert totals["requests"] == 6
    assert totals["cache_hits"] == 2
    assert totals["prompt_tokens"] == expected["prompt"]
    assert totals["completion_tokens"] == expected["completion"]
    assert totals["total_tokens"] == expected["prompt"] + expected["completion"]
    for field in ("requests", "prompt_tokens", "completion_tokens", "cache_hits"):
        assert sum(row[field] for row in report["data"]) == totals[field]
    assert {row["model"] for row in report["data"]} == {MODEL}
    assert report["data"][0]["date"] == datetime.now(UTC).date().isoformat()


async def test_reports_are_per_user_and_admin_sees_everyone(env: Running) -> None:
    alice_id, alice = await env.user()
    bob_id, bob = await env.user()
    _, admin = await env.user(role="admin")
    for key in (alice, bob, bob):
        resp = await env.http.post(
            "/v1/chat/completions", json=chat_body(f"Hi {nonce()}"), headers=auth(key)
        )
        assert resp.status_code == 200
    await env.flush()
    mine = (await env.http.get("/v1/usage", headers=auth(alice))).json()
    assert mine["totals"]["requests"] == 1
    assert all(row.get("user_id") is None for row in mine["data"])
    assert (await env.http.get("/v1/admin/usage", headers=auth(alice))).status_code == 403
    everyone = (await env.http.get("/v1/admin/usage", headers=auth(admin))).json()
    per_user = {row["user_id"]: row["requests"] for row in everyone["data"]}
    assert per_user[alice_id] == 1 and per_user[bob_id] == 2
    only_bob = await env.http.get(f"/v1/admin/usage?user_id={bob_id}", headers=auth(admin))
    assert only_bob.json()["totals"]["requests"] == 2


async def test_date_range_is_validated(env: Running) -> None:
    _, key = await env.user()
    bad = await env.http.get("/v1/usage?start=2026-13-01", headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"
    # Days only: a number is not read as a Unix time (end=0 was 1970-01-01, an empty 200).
    for query in ("end=0", "start=1700000000", "end=2026-02-01T00:00:00", "start=20260201"):
        lax = await env.http.get(f"/v1/usage?{query}", headers=auth(key))
        assert lax.status_code == 400, (query, lax.text)
        assert lax.json()["error"]["param"] == query.split("=")[0]
    reversed_ = await env.http.get("/v1/usage?start=2026-02-02&end=2026-02-01", headers=auth(key))
    assert reversed_.status_code == 400 and reversed_.json()["error"]["param"] == "start"
    empty = await env.http.get("/v1/usage?start=2001-01-01&end=2001-01-31", headers=auth(key))
    assert empty.status_code == 200
    assert empty.json()["data"] == [] and empty.json()["totals"]["requests"] == 0
    # The default start would fall before year 1 (a 500 found by schemathesis); the extremes
    # of the calendar given explicitly are ordinary dates.
    early = await env.http.get("/v1/usage?end=0001-01-01", headers=auth(key))
    assert early.status_code == 400 and early.json()["error"]["param"] == "end"
    extreme = await env.http.get("/v1/usage?start=9999-12-31&end=9999-12-31", headers=auth(key))
    assert extreme.status_code == 200 and extreme.json()["data"] == []
    assert (await env.http.get("/v1/usage")).status_code == 401


async def test_conversation_log_opt_out_and_retention(env: Running) -> None:
    user_id, key = await env.user()
    prompt = f"Say something about {nonce()}"
    resp = await env.http.post("/v1/chat/completions", json=chat_body(prompt), headers=auth(key))
    answer = resp.json()["choices"][0]["message"]["content"]
    await env.flush()
    async with env.state.db.sessions() as session:
        rows = list(await session.scalars(select(Conversation).filter_by(user_id=user_id)))
    assert len(rows) == 1
    assert rows[0].request["messages"] == [{"role": "user", "content": prompt}]
    assert rows[0].response == [answer]

    status = await env.http.put("/v1/conversation-log", json={"enabled": False}, headers=auth(key))
    assert status.status_code == 200, status.text
    assert status.json() == {"enabled": False, "server_enabled": True, "stored": 0}
    await env.http.post(
        "/v1/chat/completions", json=chat_body(f"Again {nonce()}"), headers=auth(key)
    )
    await env.flush()
    got = (await env.http.get("/v1/conversation-log", headers=auth(key))).json()
    assert got == {"enabled": False, "server_enabled": True, "stored": 0}
    assert len(await env.records(user_id=user_id)) == 2  # usage is still recorded

    bad = await env.http.put("/v1/conversation-log", json={"enabled": "no"}, headers=auth(key))
    assert bad.status_code == 400

    # Retention: rows older than the setting are deleted by the flusher's periodic pass.
    await env.http.put("/v1/conversation-log", json={"enabled": True}, headers=auth(key))
    await env.http.post(
        "/v1/chat/completions", json=chat_body(f"Third {nonce()}"), headers=auth(key)
    )
    await env.flush()
    async with env.state.db.sessions.begin() as session:
        old = datetime.now(UTC) - timedelta(days=31)
        session.add(
            Conversation(
                request_id=f"old-{nonce()}",
                user_id=user_id,
                created_at=old,
                model=MODEL,
                endpoint="chat",
                request={"messages": []},
                response=[""],
            )
        )
    flusher = env.state.usage.flusher
    flusher._last_retention = -1e9
    await flusher._retention()
    async with env.state.db.sessions() as session:
        left = list(await session.scalars(select(Conversation).filter_by(user_id=user_id)))
    assert len(left) == 1 and not left[0].request_id.startswith("old-")


async def test_overloaded_request_is_recorded_with_its_status(env: Running) -> None:
    """An error after the request reached a model (here: the admission queue is full) still
    leaves a usage record."""
    user_id, key = await env.user()
    gate = env.state.llm.gates[MODEL]
    saved = gate.slots, gate.max_waiting, gate.reserved
    gate.slots, gate.max_waiting, gate.reserved = 1, 0, 0
    try:
        long_body = chat_body(f"Write a poem {nonce()}", max_tokens=200, stop=None)
        first = asyncio.create_task(
            env.http.post("/v1/chat/completions", json=long_body, headers=auth(key))
        )
        await eventually(lambda: gate.running == 1)  # the first holds the only slot
        second = await env.http.post(
            "/v1/chat/completions", json=chat_body(f"Hi {nonce()}"), headers=auth(key)
        )
        await first
    finally:
        gate.slots, gate.max_waiting, gate.reserved = saved
    assert second.status_code == 503
    await env.flush()
    statuses = sorted(r.status for r in await env.records(user_id=user_id))
    assert statuses == [200, 503]
