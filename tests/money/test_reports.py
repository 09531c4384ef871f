"""Spend reports: /v1/usage and /v1/admin/usage sum cost exactly (nano-dollars) and group it
by key, model, team and day."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from llm_api.db.tables import Team, TeamMember
from llm_api.services.usage.repository import insert_records
from tests.conftest import create_account
from tests.money.conftest import Priced

pytestmark = pytest.mark.model

RANGE = {"start": "2025-01-01", "end": "2025-01-03"}  # days no other test writes


def ledger_row(user: str, key: str, team: str | None, model: str, day: int, cost: int) -> Any:
    return {
        "kind": "usage", "request_id": uuid.uuid4().hex, "user_id": user, "key_id": key,
        "team_id": team, "model": model, "endpoint": "chat", "prompt_tokens": 10,
        "completion_tokens": 5, "cache_hit": False, "status": 200, "latency_ms": 1.0,
        "disconnected": False, "stream": False, "cost_nanos": cost,
        "created_at": datetime(2025, 1, day, 12, tzinfo=UTC).timestamp(),
    }  # fmt: skip


async def test_spend_grouped_by_key_model_team_and_day(priced: Priced) -> None:
    admin = await create_account(priced.app, role="admin")
    me, other = priced.account, await create_account(priced.app)
    async with priced.state.db.sessions.begin() as db:
        team = Team(name="reports")
        db.add(team)
        await db.flush()
        db.add(TeamMember(team_id=team.id, user_id=other.user_id, role="member"))
        rows = [
            ledger_row(me.user_id, "k1", None, "a", 1, 100_000_001),
            ledger_row(me.user_id, "k1", None, "b", 1, 7),
            ledger_row(me.user_id, "k2", team.id, "a", 2, 300_000_000),
            ledger_row(other.user_id, "k3", team.id, "a", 2, 50),
        ]
        await insert_records(db, rows)
    http = priced.http
    admin_h = {"Authorization": f"Bearer {admin.api_key}"}

    r = await http.get("/v1/admin/usage", params={**RANGE, "group_by": "team,day"}, headers=admin_h)
    assert r.status_code == 200, r.text
    got = {(b["team_id"], b["date"]): b["cost_usd"] for b in r.json()["data"]}
    assert got == {(None, "2025-01-01"): "0.100000008", (team.id, "2025-01-02"): "0.30000005"}
    assert r.json()["totals"]["cost_usd"] == "0.400000058"

    r = await http.get(
        "/v1/admin/usage", params=[*RANGE.items(), ("group_by", "key"), ("group_by", "model")],
        headers=admin_h,
    )  # fmt: skip
    got = {(b["key_id"], b["model"]): (b["cost_usd"], b["requests"]) for b in r.json()["data"]}
    assert got == {
        ("k1", "a"): ("0.100000001", 1), ("k1", "b"): ("0.000000007", 1),
        ("k2", "a"): ("0.3", 1), ("k3", "a"): ("0.00000005", 1),
    }  # fmt: skip

    # My own usage: mine only, by model; a team's usage: its members only.
    mine = {"Authorization": f"Bearer {me.api_key}"}
    r = await http.get("/v1/usage", params={**RANGE, "group_by": "model"}, headers=mine)
    got = {b["model"]: b["cost_usd"] for b in r.json()["data"]}
    assert got == {"a": "0.400000001", "b": "0.000000007"}
    theirs = {"Authorization": f"Bearer {other.api_key}"}
    team_q = {**RANGE, "team_id": team.id, "group_by": "key"}
    r = await http.get("/v1/usage", params=team_q, headers=theirs)
    assert {b["key_id"]: b["cost_usd"] for b in r.json()["data"]} == {
        "k2": "0.3",
        "k3": "0.00000005",
    }
    assert (await http.get("/v1/usage", params=team_q, headers=mine)).status_code == 404
    bad = await http.get("/v1/usage", params={"group_by": "user"}, headers=mine)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
