"""The audit log (services/audit): events recorded by the real routes with actor, target, time,
request id, client address and before/after values; GET /v1/admin/audit with filters, paging
and CSV; the hash chain verified end to end (service and `llm-api audit verify`), tampering
found at the right row, retention keeping the rest verifiable, concurrent appends from many
connections forming one chain. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.db.tables import AuditEvent
from llm_api.services import audit
from tests.auth.conftest import CANARY_PASSWORD, AuthEnv
from tests.conftest import postgres_database, require_service
from tests.conftest import test_settings as settings_for


async def events(env: AuthEnv, **params: Any) -> list[dict[str, Any]]:
    r = await env.http.get("/v1/admin/audit", params=params, headers=env.admin.headers)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def test_admin_changes_are_recorded_with_before_and_after(env: AuthEnv) -> None:
    email = f"audited-{uuid.uuid4().hex[:8]}@example.com"
    made = await env.http.post(
        "/v1/admin/users",
        json={"email": email, "password": "a-long-password"},
        headers={**env.admin.headers, "X-Forwarded-For": "203.0.113.9"},  # not trusted
    )
    assert made.status_code == 201
    user_id = made.json()["id"]
    own_id = "client-chosen:" + "r" * 114  # a client's X-Request-ID, at its longest (128)
    r = await env.http.patch(
        f"/v1/admin/users/{user_id}",
        json={"tier": "paid"},
        headers={**env.admin.headers, "X-Request-ID": own_id},
    )
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    assert request_id == own_id
    await env.http.patch(
        f"/v1/admin/users/{user_id}", json={"is_active": False}, headers=env.admin.headers
    )
    rows = await events(env, target=user_id)
    assert [e["action"] for e in rows] == ["user.deactivated", "user.updated", "user.created"]
    deactivated, tiered, created = rows
    assert created["after"]["email"] == email and created["after"]["tier"] == "free"
    assert "password" not in str(created) and "argon2" not in str(created)
    assert tiered["before"] == {"tier": "free"} and tiered["after"] == {"tier": "paid"}
    assert tiered["request_id"] == request_id
    assert deactivated["before"] == {"is_active": True}
    for e in rows:
        assert e["actor_id"] == env.admin.user_id
        assert e["actor"].startswith(env.admin.email)
        assert e["target_type"] == "user"
        # The connection's address: an untrusted X-Forwarded-For is not believed.
        assert e["client_ip"] == "127.0.0.1"
        assert abs(e["created_at"] - datetime.now(UTC).timestamp()) < 60
    # A no-op change writes nothing.
    await env.http.patch(
        f"/v1/admin/users/{user_id}", json={"tier": "paid"}, headers=env.admin.headers
    )
    assert len(await events(env, target=user_id)) == 3


async def test_key_creation_and_revocation_are_recorded(env: AuthEnv) -> None:
    made = await env.http.post("/v1/keys", json={"name": "audited"}, headers=env.user.headers)
    key_id = made.json()["id"]
    await env.http.delete(f"/v1/keys/{key_id}", headers=env.user.headers)
    rows = await events(env, target=key_id)
    assert [e["action"] for e in rows] == ["key.revoked", "key.created"]
    assert rows[1]["after"]["name"] == "audited" and rows[1]["after"]["owner"] == env.user.user_id
    assert made.json()["key"] not in str(rows)  # the key itself is never recorded
    assert all(e["actor_id"] == env.user.user_id for e in rows)


async def test_key_changes_and_team_changes_are_recorded(env: AuthEnv) -> None:
    made = await env.http.post("/v1/keys", json={"name": "before"}, headers=env.user.headers)
    key_id = made.json()["id"]
    patched = await env.http.patch(
        f"/v1/keys/{key_id}",
        json={"name": "after", "models": ["smollm2-*"]},
        headers=env.user.headers,
    )
    assert patched.status_code == 200, patched.text
    [updated] = [e for e in await events(env, target=key_id) if e["action"] == "key.updated"]
    assert updated["before"] == {"name": "before", "models": None}
    assert updated["after"] == {"name": "after", "models": ["smollm2-*"]}

    team = await env.http.post("/v1/teams", json={"name": "audited"}, headers=env.user.headers)
    assert team.status_code == 201, team.text
    team_id = team.json()["id"]
    h = env.user.headers
    assert (
        await env.http.post(f"/v1/teams/{team_id}/members/{env.other.user_id}", headers=h)
    ).is_success
    patch = {"role": "admin"}
    assert (
        await env.http.patch(
            f"/v1/teams/{team_id}/members/{env.other.user_id}", json=patch, headers=h
        )
    ).is_success
    service = await env.http.post(f"/v1/teams/{team_id}/keys", json={"name": "svc"}, headers=h)
    assert service.status_code == 201, service.text
    assert (
        await env.http.delete(f"/v1/teams/{team_id}/members/{env.other.user_id}", headers=h)
    ).is_success
    assert (await env.http.delete(f"/v1/teams/{team_id}", headers=h)).is_success
    actions = [e["action"] for e in await events(env, target=team_id)]
    assert actions == [
        "team.deleted",
        "team.member_removed",
        "team.member_role_changed",
        "team.member_added",
        "team.created",
    ]
    [svc] = await events(env, target=service.json()["id"])
    assert svc["action"] == "key.created" and svc["after"]["team_id"] == team_id
    assert service.json()["key"] not in str(svc)


async def test_budget_changes_are_recorded(env: AuthEnv) -> None:
    h = env.user.headers
    body = {"scope": "user", "subject_id": env.user.user_id, "period": "day", "hard_limit_usd": 5}
    made = await env.http.post("/v1/budgets", json=body, headers=h)
    assert made.status_code == 201, made.text
    budget_id = made.json()["id"]
    changed = await env.http.patch(
        f"/v1/budgets/{budget_id}", json={"hard_limit_usd": 7}, headers=h
    )
    assert changed.status_code == 200, changed.text
    assert (await env.http.delete(f"/v1/budgets/{budget_id}", headers=h)).status_code == 204
    deleted, updated, created = await events(env, target=budget_id)
    assert [deleted["action"], updated["action"], created["action"]] == [
        "budget.deleted",
        "budget.updated",
        "budget.created",
    ]
    assert created["after"]["hard_limit_nanos"] == 5_000_000_000
    assert updated["before"] == {"hard_limit_nanos": 5_000_000_000}
    assert updated["after"] == {"hard_limit_nanos": 7_000_000_000}
    assert deleted["before"]["scope"] == "user"


async def test_logins_refusals_and_refresh_reuse_are_recorded(env: AuthEnv) -> None:
    bad = await env.http.post(
        "/v1/auth/token", data={"username": env.user.email, "password": "wrong-" + CANARY_PASSWORD}
    )
    assert bad.status_code == 401
    ghost = await env.http.post(
        "/v1/auth/token", data={"username": CANARY_PASSWORD, "password": "whatever-it-is"}
    )
    assert ghost.status_code == 401
    good = await env.http.post(
        "/v1/auth/token", data={"username": env.user.email, "password": env.user.password}
    )
    assert good.status_code == 200
    refresh = good.json()["refresh_token"]
    assert (await env.http.post("/v1/auth/refresh", json={"refresh_token": refresh})).is_success
    reused = await env.http.post("/v1/auth/refresh", json={"refresh_token": refresh})
    assert reused.status_code == 401

    mine = await events(env, target=env.user.user_id, action="auth.")
    actions = [e["action"] for e in mine]
    assert actions[:3] == ["auth.refresh_token_reused", "auth.login", "auth.login_failed"]
    assert mine[1]["actor_id"] == env.user.user_id and mine[1]["after"]["method"] == "password"
    # The refusal outlives its request's rollback; it names the account, never the password.
    assert mine[2]["actor"] == "anonymous" and mine[2]["after"]["known_account"] is True
    unknown = (await events(env, action="auth.login_failed"))[0]
    assert unknown["target_id"] is None and unknown["after"]["known_account"] is False
    every = await env.http.get("/v1/admin/audit?limit=500", headers=env.admin.headers)
    assert CANARY_PASSWORD not in every.text and refresh not in every.text


async def test_settings_at_start_are_recorded_with_secrets_masked(env: AuthEnv) -> None:
    started = await events(env, action="server.started")
    assert started, "no server.started event"
    settings = started[-1]["after"]["settings"]
    assert started[-1]["actor"] == "system"
    assert settings["jwt_secret"] == "[REDACTED]"
    assert settings["environment"] == "test"
    secret = env.app.state.llm_api.settings.jwt_secret
    r = await env.http.get("/v1/admin/audit?action=server.started", headers=env.admin.headers)
    assert secret not in r.text
    if env.kind == "postgres":
        assert "postgresql+asyncpg://" in settings["database_url"]


async def test_audit_is_admin_only(env: AuthEnv) -> None:
    assert (await env.http.get("/v1/admin/audit")).status_code == 401
    r = await env.http.get("/v1/admin/audit", headers=env.user.headers)
    assert r.status_code == 403
    # An administrator's key without the admin scope is refused too.
    key = await env.http.post(
        "/v1/keys", json={"scopes": ["inference", "keys"]}, headers=env.admin.headers
    )
    narrow = {"Authorization": f"Bearer {key.json()['key']}"}
    r = await env.http.get("/v1/admin/audit", headers=narrow)
    assert r.status_code == 403


async def test_filters_paging_and_bad_input(env: AuthEnv) -> None:
    for _ in range(3):
        await env.http.patch(
            "/v1/users/me", json={"display_name": uuid.uuid4().hex[:6]}, headers=env.other.headers
        )
    first = await env.http.get(
        "/v1/admin/audit",
        params={"actor": env.other.user_id, "limit": 2},
        headers=env.admin.headers,
    )
    page = first.json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    second = await env.http.get(
        "/v1/admin/audit",
        params={"actor": env.other.user_id, "limit": 2, "before": page["next_before"]},
        headers=env.admin.headers,
    )
    seqs = [e["seq"] for e in page["data"] + second.json()["data"]]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs) >= 3
    now = int(datetime.now(UTC).timestamp())
    assert await events(env, actor=env.other.user_id, since=now + 3600) == []
    assert len(await events(env, actor=env.other.user_id, until=now + 3600)) >= 3
    for bad in (
        {"limit": 0},
        {"since": -1},
        {"before": "x"},
        {"format": "xml"},
        {"actor": "a\x00b"},
    ):
        r = await env.http.get("/v1/admin/audit", params=bad, headers=env.admin.headers)
        assert r.status_code == 400, (bad, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_csv_export_quotes_formulas(env: AuthEnv) -> None:
    # An email is a legal place for a formula: the actor cell of this user's events starts
    # with "=", which a spreadsheet would run unless quoted.
    email = f"=1+2-{uuid.uuid4().hex[:6]}@example.com"
    made = await env.http.post(
        "/v1/admin/users",
        json={"email": email, "password": "a-long-password"},
        headers=env.admin.headers,
    )
    user_id = made.json()["id"]
    login = await env.http.post(
        "/v1/auth/token", data={"username": email, "password": "a-long-password"}
    )
    bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
    await env.http.patch("/v1/users/me", json={"display_name": "@SUM(A1)"}, headers=bearer)
    for params, headers in (
        ({"format": "csv", "actor": user_id}, env.admin.headers),
        ({"actor": user_id}, {**env.admin.headers, "Accept": "text/csv"}),
    ):
        r = await env.http.get("/v1/admin/audit", params=params, headers=headers)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"].startswith("attachment")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["action"] for row in rows] == ["user.updated", "auth.login"]
        assert rows[0]["actor"] == "'" + email  # quoted, so not a formula
        assert json.loads(rows[0]["after"]) == {"display_name": "@SUM(A1)"}
        cells = [c for row in rows for c in row.values()]
        assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)
    r = await env.http.get("/v1/admin/audit?format=csv", headers=env.user.headers)
    assert r.status_code == 403


def test_failure_sampler_bounds_rows_and_counts_the_rest() -> None:
    sampler = audit.FailureSampler(per_minute=2)
    assert [sampler.admit(), sampler.admit(), sampler.admit(), sampler.admit()] == [
        0,
        0,
        None,
        None,
    ]
    sampler.window_start -= 61  # the next minute
    assert sampler.admit() == 2  # the next row says how many were left out


# --- the chain on a database of its own ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def chain_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database.from_settings(settings_for(tmp_path))
        await migrate.upgrade(db.engine)
        yield db
        await db.dispose()
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with postgres_database() as url:
        db = Database.from_settings(settings_for(tmp_path), url)
        await migrate.upgrade(db.engine)
        db.url = url  # type: ignore[attr-defined]  # for the CLI
        yield db
        await db.dispose()


async def _append(db: Database, n: int, prefix: str = "test") -> None:
    for i in range(n):
        await audit.record_now(
            db.sessions,
            audit.SYSTEM,
            f"{prefix}.event",
            audit.Target("thing", str(i)),
            after={"i": i, "nested": {"x": [1, 2.5, None, "é"]}},
        )


async def test_concurrent_appends_form_one_chain(chain_db: Database) -> None:
    async def writer(w: int) -> None:
        await _append(chain_db, 5, prefix=f"w{w}")

    await asyncio.gather(*(writer(w) for w in range(6)))
    result = await _verify(chain_db)
    assert result.ok, result
    assert result.checked == 30 and result.head_seq == 30


async def _verify(db: Database) -> audit.Verification:
    async with db.sessions() as session:
        return await audit.verify(session)


async def test_tampering_is_found_at_the_first_broken_row(chain_db: Database) -> None:
    await _append(chain_db, 6)
    assert (await _verify(chain_db)).ok
    async with chain_db.sessions.begin() as s:  # an edit behind the application's back
        await s.execute(update(AuditEvent).where(AuditEvent.seq == 4).values(actor="mallory"))
    result = await _verify(chain_db)
    assert not result.ok and result.broken_seq == 4 and result.checked == 3
    assert "content" in (result.reason or "")


async def test_deleted_row_and_truncated_tail_are_found(chain_db: Database) -> None:
    await _append(chain_db, 5)
    async with chain_db.sessions.begin() as s:
        await s.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    result = await _verify(chain_db)
    assert not result.ok and result.broken_seq == 3
    async with chain_db.sessions.begin() as s:
        await s.execute(text("DELETE FROM audit_events WHERE seq >= 3"))
    result = await _verify(chain_db)
    assert not result.ok and result.broken_seq == 3 and "head says 5" in (result.reason or "")


async def test_retention_keeps_the_rest_verifiable(chain_db: Database) -> None:
    await _append(chain_db, 4)
    async with chain_db.sessions.begin() as s:  # the first three are a year old
        await s.execute(
            update(AuditEvent)
            .where(AuditEvent.seq <= 3)
            .values(created_at=datetime.now(UTC) - timedelta(days=400))
        )
    # Re-hash those rows as if they had been written then (the change above broke them).
    async with chain_db.sessions.begin() as s:
        prev = audit.GENESIS_HASH
        for event in (
            await s.execute(AuditEvent.__table__.select().order_by(AuditEvent.seq))
        ).all():
            row = await s.get(AuditEvent, event.seq)
            assert row is not None
            row.prev_hash, row.hash = prev, audit.chain_hash(prev, row)
            prev = row.hash
        await s.execute(text(f"UPDATE audit_chain_head SET hash = '{prev}'"))
    assert (await _verify(chain_db)).ok
    async with chain_db.sessions.begin() as s:
        assert await audit.purge(s, datetime.now(UTC) - timedelta(days=365)) == 3
    result = await _verify(chain_db)
    assert result.ok and result.anchor_seq == 3 and result.checked == 1
    await _append(chain_db, 2)  # appends continue from the head
    result = await _verify(chain_db)
    assert result.ok and result.head_seq == 6 and result.checked == 3


async def test_cli_verify_reports_the_first_broken_link(chain_db: Database, tmp_path: Path) -> None:
    await _append(chain_db, 3)
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
    }
    if hasattr(chain_db, "url"):
        env["LLM_API_DATABASE_URL"] = chain_db.url
    cli = [sys.executable, "-m", "llm_api.cli", "audit", "verify"]
    ok = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "audit chain OK: 3 rows verified" in ok.stdout
    async with chain_db.sessions.begin() as s:
        await s.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(after={"i": 99}))
    bad = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "BROKEN at row 2" in bad.stderr and "1 rows verified" in bad.stderr
