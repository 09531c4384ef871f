"""The proof (issue 26, point 5): two server processes sharing Redis and PostgreSQL, one team
budget, 300 concurrent streamed requests with random max_tokens, a third of them abandoned by
their client part-way. Then:

- the settled spend (the ledger) never exceeds the budget;
- no request started after the budget was spent except within one reservation: every admitted
  request's reservation fitted what was left (its x-llm-api-budget-remaining is >= 0), and
  every refused one was refused because its reservation did not fit ($left < $may cost);
- the ledger's total equals, to the nano-dollar, the sum of the `usage.cost` the clients were
  told plus the recorded cost of the abandoned streams (which paid for what was generated);
- the shared counter in Redis equals the ledger (no reservation left outstanding).

The upstream is the stub from bench/ (a local model would take minutes for 300 requests on two
shared cores); its prices come from a models file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from redis.asyncio import Redis
from sqlalchemy import func, select

from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.db.tables import Budget, Team, TeamMember, UsageRecord, User
from llm_api.services.auth import api_keys, scopes
from llm_api.services.money.periods import period_key
from tests.conftest import LiveServer, free_port, postgres_database, require_service, service_up
from tests.conftest import test_settings as settings_for
from tests.rate_limit.conftest import delete_prefix, unique_prefix

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

REQUESTS = 300
BUDGET_NANOS = 60_000_000  # $0.06: roughly half of what 300 requests would cost
PRICES = {"input": "3", "output": "15"}  # USD per million tokens
REFUSED = re.compile(r"\$([0-9.]+) left, and this request may cost up to \$([0-9.]+)")


@contextlib.contextmanager
def stub_upstream() -> Iterator[str]:
    """bench/stub_upstream.py as a process: 48 tokens, 2 ms apart (time to hang up mid-way)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.stub_upstream", "--port", str(port), "--tokens", "48",
         "--interval", "0.002"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not service_up("127.0.0.1", port):
            assert time.monotonic() < deadline and proc.poll() is None, "stub did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


def serve(tmp: Path, env: dict[str, str]) -> LiveServer:
    """`llm-api serve` (uvicorn) in a subprocess on a free port, ready. The database is
    migrated and the accounts made before, by the test."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / "server.log"
    full_env = {
        **os.environ, **env, "LLM_API_ENVIRONMENT": "test", "LLM_API_DATA_DIR": str(tmp),
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40, "LLM_API_PORT": str(port),
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "serve"], env=full_env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = LiveServer(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/ready", timeout=1).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server not ready: {log.read_text()[-2000:]}")


@dataclass
class Outcome:
    server: int
    status: int = 0
    request_id: str = ""
    cost_nanos: int | None = None  # what the client was told (completed streams)
    abandoned: bool = False
    remaining: float | None = None
    refusal: str = ""


async def one(http: httpx.AsyncClient, servers: list[LiveServer], key: str, i: int) -> Outcome:
    rng = random.Random(i)
    await asyncio.sleep(rng.uniform(0, 4))  # arrivals spread over 4 s
    out = Outcome(server=rng.randrange(2))
    hang_up_after = rng.randint(1, 6) if rng.random() < 0.33 else None
    body = {
        "model": "priced-stub", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": rng.randint(1, 48), "messages": [{"role": "user", "content": f"n{i}"}],
    }  # fmt: skip
    url = f"{servers[out.server].base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", url, json=body, headers=headers) as response:
        out.status = response.status_code
        out.request_id = response.headers.get("x-request-id", "")
        if response.status_code != 200:
            error = orjson.loads(await response.aread())["error"]
            assert error["code"] == "insufficient_quota", error
            out.refusal = error["message"]
            return out
        out.remaining = float(response.headers["x-llm-api-budget-remaining"])
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                out.abandoned = True  # leaving the block closes the connection mid-stream
                return out
            usage = orjson.loads(line[6:]).get("usage")
            if usage:
                out.cost_nanos = round(usage["cost"] * 1e9)
    return out


async def test_two_replicas_one_team_budget(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    prefix = unique_prefix()
    with stub_upstream() as upstream:
        models = tmp_path / "models.yaml"
        models.write_text(yaml.safe_dump({"models": [
            {"id": "priced-stub", "backend": "openai", "base_url": upstream, "pricing": PRICES,
             "concurrency": REQUESTS, "max_queue": REQUESTS},
        ]}))  # fmt: skip
        async with postgres_database() as url:
            env = {
                "LLM_API_DATABASE_URL": url,
                "LLM_API_REDIS_URL": "redis://127.0.0.1:6379/0",
                "LLM_API_RATE_LIMIT_KEY_PREFIX": prefix,
                "LLM_API_MODELS_FILE": str(models),
                "LLM_API_BUDGET_REFRESH_SECONDS": "0.2",
                "LLM_API_USAGE_FLUSH_INTERVAL_SECONDS": "0.2",
                "LLM_API_CACHE_ENABLED": "false",
                "LLM_API_RATE_LIMIT_ENABLED": "false",  # budgets apply all the same
                "LLM_API_LOG_LEVEL": "WARNING",
            }
            servers: list[LiveServer] = []
            db = Database.from_settings(settings_for(tmp_path), url)
            try:
                await migrate.upgrade(db.engine)
                team_id, key = await team_budget(db)
                started = [asyncio.to_thread(serve, tmp_path / f"s{n}", env) for n in range(2)]
                for result in await asyncio.gather(*started, return_exceptions=True):
                    if isinstance(result, BaseException):
                        raise result
                    servers.append(result)
                await run_and_check(db, servers, team_id, key)
            finally:
                for server in servers:
                    server.stop()
                await db.dispose()
                await delete_prefix(prefix)


async def team_budget(db: Database) -> tuple[str, str]:
    async with db.sessions.begin() as session:
        user = User(email="owner@example.com", password_hash="not-a-login")
        session.add(user)
        await session.flush()
        team = Team(name="replicas")
        session.add(team)
        await session.flush()
        session.add(TeamMember(team_id=team.id, user_id=user.id, role="owner"))
        key, raw = await api_keys.create_key(session, user.id, "svc", scopes.allowed_for("user"))
        key.team_id = team.id
        session.add(Budget(
            scope="team", subject_id=team.id, period="month", hard_limit_nanos=BUDGET_NANOS,
        ))  # fmt: skip
    return team.id, raw


async def run_and_check(db: Database, servers: list[LiveServer], team_id: str, key: str) -> None:
    limits = httpx.Limits(max_connections=REQUESTS + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        # Both processes have loaded the budget (LLM_API_BUDGET_REFRESH_SECONDS) before the load.
        for server in servers:
            async with asyncio.timeout(20):
                while True:
                    probe = await one(http, [server, server], key, -1)
                    if probe.remaining is not None or probe.refusal:
                        break
        outs = await asyncio.gather(*(one(http, servers, key, i) for i in range(REQUESTS)))

    admitted = [o for o in outs if o.status == 200]
    refused = [o for o in outs if o.status == 429]
    assert len(admitted) + len(refused) == REQUESTS
    assert refused, "the budget was never exhausted"
    assert {o.server for o in admitted} == {0, 1}
    abandoned = [o for o in admitted if o.abandoned]
    completed = [o for o in admitted if not o.abandoned]
    assert abandoned and all(o.cost_nanos is not None for o in completed)
    # Admitted only within what was left; refused only when the reservation did not fit.
    assert all(o.remaining is not None and o.remaining >= 0 for o in admitted)
    for o in refused:
        match = REFUSED.search(o.refusal)
        assert match, o.refusal
        assert float(match[1]) < float(match[2]), o.refusal

    # Every admitted request (the probes too) reaches the ledger of one of the two processes.
    async def ledger() -> list[UsageRecord]:
        async with db.sessions() as session:
            return list(await session.scalars(
                select(UsageRecord).where(UsageRecord.team_id == team_id)))  # fmt: skip

    ids = {o.request_id for o in admitted}
    async with asyncio.timeout(30):
        while True:
            rows = await ledger()
            if ids <= {r.request_id for r in rows}:
                break
            await asyncio.sleep(0.2)
    by_id = {r.request_id: r for r in rows}
    total = sum(r.cost_nanos for r in rows)
    assert total <= BUDGET_NANOS
    for o in completed:
        assert by_id[o.request_id].cost_nanos == o.cost_nanos, o
    told = sum(o.cost_nanos or 0 for o in completed)
    probes = [r for r in rows if r.request_id not in ids]
    cancelled = sum(by_id[o.request_id].cost_nanos for o in abandoned)
    assert total == told + cancelled + sum(r.cost_nanos for r in probes)
    assert any(
        by_id[o.request_id].disconnected and by_id[o.request_id].cost_nanos for o in abandoned
    )

    # The shared counter (spent + outstanding reservations) equals the ledger: nothing held.
    async with db.sessions() as session:
        budget_id = await session.scalar(select(Budget.id).where(Budget.subject_id == team_id))
        count = await session.scalar(select(func.count()).select_from(UsageRecord))
    assert count == len(rows)
    period = period_key("month", datetime.now(UTC))
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [
            k
            async for k in redis.scan_iter(match=f"*:team:{team_id}:{budget_id}:{period}:budget:t")
        ]
        assert len(keys) == 1, keys
        async with asyncio.timeout(10):  # the last settlements are a moment behind the ledger
            while int(await redis.get(keys[0]) or 0) != total:
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
