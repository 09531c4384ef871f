"""Files and batches under abuse and faults (issue 22, items 11 and 21): per-user quotas,
batch creation counted against request limits, validation off the event loop, private file
modes, a deactivated user's batches cancelled, and one log line per database outage from the
batch dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from llm_api.core.logging import configure_logging
from llm_api.db.engine import Database
from llm_api.db.tables import Base, Batch
from llm_api.services.batches.dispatcher import DispatchHealth, dispatch_forever
from tests.conftest import (
    Account,
    create_account,
    eventually,
    postgres_database,
    require_service,
    running_app,
    start_live_server,
)
from tests.conftest import test_settings as make_settings
from tests.test_batches import chat_lines, jsonl, wait_for
from tests.usage.conftest import PG_PORT, TcpProxy


def sdk(app: Any, account: Account) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key=account.api_key,
        http_client=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ),
        max_retries=0,
    )


def upload(client: openai.AsyncOpenAI, data: bytes) -> Any:
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")


def create(client: openai.AsyncOpenAI, file_id: str) -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


# --- quotas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_storage_file_count_and_active_batch_quotas_answer_400(
    tmp_path: Path, database: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = None
        if database == "postgresql":  # the quota check takes a row lock there
            require_service("PostgreSQL", "127.0.0.1", PG_PORT)
            url = await stack.enter_async_context(postgres_database())
        settings = make_settings(
            tmp_path,
            warmup=False,
            database_url=url,
            db_auto_migrate=True,
            files_max_bytes_per_user=8192,
            files_max_count_per_user=3,
            batch_max_active_per_user=1,
        )
        app = await stack.enter_async_context(running_app(settings))
        client = sdk(app, await create_account(app))
        long = chat_lines(20, max_tokens=48)
        assert 4096 < len(long) <= 8192
        first = await upload(client, long)
        # Bytes: a second copy would store more than 8192 bytes.
        with pytest.raises(openai.BadRequestError) as exc:
            await upload(client, long)
        assert exc.value.code == "storage_quota_exceeded"
        assert "8192 bytes" in exc.value.message
        # Active batches: one at a time.
        batch = await create(client, first.id)
        with pytest.raises(openai.BadRequestError) as exc:
            await create(client, first.id)
        assert exc.value.code == "batch_limit_exceeded"
        assert "limit 1" in exc.value.message
        # Files: the input and the running batch's output and error files make three.
        await wait_for(client, batch.id, ("in_progress", "completed"))
        with pytest.raises(openai.BadRequestError) as exc:
            await upload(client, chat_lines(1))
        assert exc.value.code == "file_quota_exceeded"
        await client.batches.cancel(batch.id)
        # Another user has quotas of their own.
        other = sdk(app, await create_account(app))
        assert (await upload(other, long)).bytes == len(long)


async def test_concurrent_uploads_cannot_both_pass_the_quota_on_postgresql(
    tmp_path: Path,
) -> None:
    require_service("PostgreSQL", "127.0.0.1", PG_PORT)
    async with postgres_database() as url:
        settings = make_settings(
            tmp_path,
            warmup=False,
            database_url=url,
            db_auto_migrate=True,
            files_max_count_per_user=1,
        )
        async with running_app(settings) as app:
            client = sdk(app, await create_account(app))
            results = await asyncio.gather(
                *(upload(client, chat_lines(200, prefix=f"c{i}")) for i in range(12)),
                return_exceptions=True,
            )
            stored = (await client.files.list()).data
    assert len(stored) == 1, results
    refused = [r for r in results if isinstance(r, openai.BadRequestError)]
    assert len(refused) == 11 and all(r.code == "file_quota_exceeded" for r in refused)


async def test_batch_creation_and_uploads_count_against_request_limits(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        warmup=False,
        rate_limit_enabled=True,
        rate_limit_tiers={"free": {"requests_per_minute": 2}},
    )
    async with running_app(settings) as app:
        client = sdk(app, await create_account(app))
        uploaded = await upload(client, chat_lines(1))  # request 1
        await create(client, uploaded.id)  # request 2
        with pytest.raises(openai.RateLimitError) as exc:
            await create(client, uploaded.id)
        assert "requests per minute" in exc.value.message
        with pytest.raises(openai.RateLimitError):
            await upload(client, chat_lines(1))


async def test_uploads_may_be_as_large_as_the_file_limit_not_the_body_limit(
    tmp_path: Path,
) -> None:
    """Request bodies are capped at LLM_API_MAX_BODY_BYTES (1 MB), but /v1/files at the batch
    file limit: a 1.5 MB file is accepted, a body over the file limit is still a 413."""
    limit = 2 * 1024 * 1024
    settings = make_settings(tmp_path, warmup=False, batch_max_file_bytes=limit)
    async with running_app(settings) as app:
        client = sdk(app, await create_account(app))
        data = big_input(4000)
        assert 1024 * 1024 < len(data) < limit
        assert (await upload(client, data)).bytes == len(data)
        with pytest.raises(openai.APIStatusError) as exc:
            await upload(client, big_input(9000))
        assert exc.value.status_code == 413


# --- validation off the event loop --------------------------------------------------------------


def big_input(lines: int) -> bytes:
    padding = "x" * 200
    return jsonl(
        [
            {
                "custom_id": f"r-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "max_tokens": 4,
                    "messages": [
                        {"role": "system", "content": padding},
                        {"role": "user", "content": f"n {i}"},
                    ],
                },
            }
            for i in range(lines)
        ]
    )


async def test_server_keeps_serving_while_a_large_upload_validates(tmp_path: Path) -> None:
    """Validating 50 000 lines takes seconds of CPU. /health is polled all the while: with the
    validation on the event loop one /health waits out all of it; in a thread, none waits more
    than a small part of the upload."""
    server = start_live_server(tmp_path, env={"LLM_API_WARMUP": "false"})
    try:
        data = big_input(50_000)
        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:

            async def send() -> httpx.Response:
                return await http.post(
                    "/v1/files",
                    headers=server.headers,
                    files={"file": ("big.jsonl", data)},
                    data={"purpose": "batch"},
                )

            started = time.monotonic()
            task = asyncio.create_task(send())
            while not task.done():
                sent = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.monotonic() - sent)
            elapsed = time.monotonic() - started
            response = task.result()
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == len(data)
        print(f"upload {elapsed:.2f} s; /health x{len(latencies)}, slowest {max(latencies):.3f} s")
        assert max(latencies) < elapsed / 4, (max(latencies), elapsed, len(latencies))
    finally:
        server.stop()


# --- file modes ---------------------------------------------------------------------------------


async def test_everything_under_data_dir_is_private(tmp_path: Path) -> None:
    """Uploads, batch results, the usage buffer and the SQLite database (with its -wal/-shm
    files): 0600 files in 0700 directories, whatever the umask."""
    data_dir = tmp_path / "data"
    old_umask = os.umask(0o022)
    try:
        async with running_app(make_settings(data_dir, warmup=False)) as app:
            client = sdk(app, await create_account(app))
            batch = await create(client, (await upload(client, chat_lines(2))).id)
            done = await wait_for(client, batch.id, ("completed",), timeout=120)
            assert done.output_file_id
            await app.state.llm_api.usage.buffer.rotate()  # a closed segment as well
            seen = {p.name for p in data_dir.rglob("*")}
            assert "llm-api.db" in seen and "llm-api.db-wal" in seen
            assert done.output_file_id in seen and "usage" in seen
            wrong = [
                f"{p.relative_to(data_dir)} {stat.filemode(p.stat().st_mode)}"
                for p in [data_dir, *data_dir.rglob("*")]
                if p.stat().st_mode & 0o077
            ]
            assert not wrong, wrong
    finally:
        os.umask(old_umask)


# --- deactivation -------------------------------------------------------------------------------


async def test_deactivating_a_user_cancels_their_batches(app: Any, admin_account: Account) -> None:
    victim = await create_account(app)
    client = sdk(app, victim)
    uploaded = await upload(client, chat_lines(30, max_tokens=48, prefix="d"))
    running = await create(client, uploaded.id)
    queued = await create(client, uploaded.id)  # the embedded worker runs one batch at a time
    deadline = time.monotonic() + 300
    while True:
        current = await client.batches.retrieve(running.id)
        if current.request_counts and current.request_counts.completed >= 1:
            break
        assert current.status in ("validating", "in_progress"), current
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as http:
        login = await http.post(
            "/v1/auth/token",
            data={"username": admin_account.email, "password": admin_account.password},
        )
        assert login.status_code == 200, login.text
        admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
        patch = await http.patch(
            f"/v1/admin/users/{victim.user_id}", json={"is_active": False}, headers=admin
        )
        assert patch.status_code == 200, patch.text

    sessions = app.state.llm_api.db.sessions

    async def batch(batch_id: str) -> Batch:
        async with sessions() as s:
            row = await s.scalar(select(Batch).where(Batch.id == batch_id))
            assert row is not None
            return row

    async def both_finished() -> bool:
        statuses = [(await batch(b.id)).status for b in (running, queued)]
        return all(s in ("completed", "failed", "cancelled") for s in statuses)

    await eventually(both_finished, timeout=60)
    first, second = await batch(running.id), await batch(queued.id)
    assert first.status == "cancelled" and first.completed < 30
    assert second.status == "cancelled" and second.completed == 0


# --- the dispatcher during a database outage ----------------------------------------------------


async def test_dispatcher_logs_one_warning_per_database_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_service("PostgreSQL", "127.0.0.1", PG_PORT)
    configure_logging(make_settings(tmp_path))
    caplog.set_level(logging.INFO, logger="llm_api.services.batches.dispatcher")
    logging.getLogger().addHandler(caplog.handler)  # configure_logging replaced the handlers
    async with postgres_database() as url:
        direct = Database.from_settings(make_settings(tmp_path), url)
        async with direct.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await direct.dispose()
        proxy = TcpProxy(PG_PORT)
        await proxy.open()
        db = Database.from_settings(
            make_settings(tmp_path), url.replace(f":{PG_PORT}/", f":{proxy.port}/")
        )
        health = DispatchHealth()

        async def handle(batch_id: str) -> None:
            pass

        task = asyncio.create_task(dispatch_forever(db.sessions, handle, 0.02, health=health))
        try:
            await eventually(lambda: health.rounds >= 3)
            assert health.outages == 0
            await proxy.close()  # PostgreSQL is unreachable
            await eventually(lambda: health.failed_rounds >= 20, timeout=60)
            await proxy.open()
            await eventually(lambda: health.failing_since is None, timeout=60)
            rounds = health.rounds
            await eventually(lambda: health.rounds >= rounds + 3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await db.dispose()
            await proxy.close()
            logging.getLogger().removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name == "llm_api.services.batches.dispatcher"]
    events = [(r.levelname, r.msg["event"]) for r in records]  # type: ignore[index]
    assert events == [
        ("WARNING", "batch_dispatch_unavailable"),
        ("INFO", "batch_dispatch_recovered"),
    ]
    assert "exc_info" not in records[0].msg  # a line, not a traceback
    assert health.outages == 1
