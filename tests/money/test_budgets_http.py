"""Budgets over HTTP: who may manage which (outsiders get 404), enforcement with the openai SDK
(429 insufficient_quota once spent, never more spent than the budget), the budget headers, and
the soft-limit webhook: HMAC-signed, sent once per crossing, through the outbox."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import openai
import orjson
import pytest

from llm_api.db.tables import Team, TeamMember
from llm_api.services.auth import api_keys, scopes
from llm_api.services.money.webhooks import verify
from tests.conftest import MODEL, Account, create_account
from tests.money.conftest import WEBHOOK_SECRET, Priced

pytestmark = pytest.mark.model


async def team_with(priced: Priced, roles: dict[str, str]) -> tuple[str, str]:
    """A team with these members (user id → role) and a service key of it: (team id, raw key)."""
    state = priced.state
    async with state.db.sessions.begin() as db:
        team = Team(name=f"team-{uuid.uuid4().hex[:6]}")
        db.add(team)
        await db.flush()
        for user_id, role in roles.items():
            db.add(TeamMember(team_id=team.id, user_id=user_id, role=role))
        owner = next(u for u, r in roles.items() if r == "owner")
        key, raw = await api_keys.create_key(db, owner, "service", scopes.allowed_for("user"))
        key.team_id = team.id
    return team.id, raw


def auth(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.api_key}"}


async def test_who_may_manage_which_budget(priced: Priced) -> None:
    http, me = priced.http, priced.account
    other = await create_account(priced.app)
    admin = await create_account(priced.app, role="admin")
    member = await create_account(priced.app)
    team_id, _ = await team_with(priced, {me.user_id: "owner", member.user_id: "member"})
    mine = {"scope": "user", "subject_id": me.user_id, "period": "day", "hard_limit_usd": "5"}

    r = await http.post("/v1/budgets", json=mine, headers=auth(me))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["hard_limit_usd"] == "5" and created["spent_usd"] == "0"
    # Another user's budget does not exist for them; their own user is not mine to limit.
    assert (await http.get(f"/v1/budgets/{created['id']}", headers=auth(other))).status_code == 404
    theirs = {**mine, "subject_id": other.user_id}
    assert (await http.post("/v1/budgets", json=theirs, headers=auth(me))).status_code == 404
    assert (await http.post("/v1/budgets", json=theirs, headers=auth(admin))).status_code == 201
    # My key: mine; the same period twice: 409.
    key = {"scope": "key", "subject_id": me.key_id, "period": "month", "hard_limit_usd": 2.5}
    assert (await http.post("/v1/budgets", json=key, headers=auth(me))).status_code == 201
    assert (await http.post("/v1/budgets", json=key, headers=auth(me))).status_code == 409
    assert (await http.post("/v1/budgets", json=key, headers=auth(other))).status_code == 404
    # A team's: its owner manages it, a member reads it, an outsider sees nothing.
    team = {"scope": "team", "subject_id": team_id, "hard_limit_usd": "1", "soft_limit_usd": "2"}
    assert (await http.post("/v1/budgets", json=team, headers=auth(me))).status_code == 400
    team["soft_limit_usd"] = "0.5"
    assert (await http.post("/v1/budgets", json=team, headers=auth(member))).status_code == 404
    r = await http.post("/v1/budgets", json=team, headers=auth(me))
    assert r.status_code == 201
    team_budget = r.json()["id"]
    assert (await http.get(f"/v1/budgets/{team_budget}", headers=auth(member))).status_code == 200
    patch = {"hard_limit_usd": "3"}
    path = f"/v1/budgets/{team_budget}"
    assert (await http.patch(path, json=patch, headers=auth(member))).status_code == 404
    assert (await http.get(path, headers=auth(other))).status_code == 404
    r = await http.patch(path, json=patch, headers=auth(me))
    assert r.status_code == 200 and r.json()["hard_limit_usd"] == "3"
    listed = {b["id"] for b in (await http.get("/v1/budgets", headers=auth(member))).json()["data"]}
    assert listed == {team_budget}
    assert (await http.delete(path, headers=auth(other))).status_code == 404
    assert (await http.delete(path, headers=auth(me))).status_code == 204
    assert (await http.get(path, headers=auth(me))).status_code == 404


async def test_team_budget_refuses_once_spent_and_alerts_once(priced: Priced) -> None:
    http, me = priced.http, priced.account
    team_id, service_key = await team_with(priced, {me.user_id: "owner"})
    body = {
        "scope": "team", "subject_id": team_id, "period": "month",
        "hard_limit_usd": "0.06", "soft_limit_usd": "0.02",
    }  # fmt: skip
    r = await http.post("/v1/budgets", json=body, headers=auth(me))
    assert r.status_code == 201, r.text
    budget_id = r.json()["id"]
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key=service_key, http_client=http, max_retries=0
    )
    spent, refused, warned = 0.0, None, False
    for i in range(30):
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=8, temperature=0.9,
                messages=[{"role": "user", "content": f"Count to {i}."}],
            )  # fmt: skip
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert float(raw.headers["x-llm-api-budget-remaining"]) <= 0.06
        warned = warned or "x-llm-api-budget-warning" in raw.headers
        usage = raw.parse().usage
        assert usage is not None
        spent += (usage.model_extra or {})["cost"]
    assert refused is not None, "the budget never ran out"
    assert refused.code == "insufficient_quota" and refused.status_code == 429
    assert "team's monthly budget of $0.06 is exhausted" in refused.message
    assert refused.response.headers["x-should-retry"] == "false"
    assert warned and 0.02 <= spent <= 0.06
    # The ledger agrees, to the nano-dollar, and knows the team.
    await priced.flush()
    records = await priced.records(team_id=team_id)
    assert sum(r.cost_nanos for r in records) == round(spent * 1e9)
    r = await http.get(f"/v1/budgets/{budget_id}", headers=auth(me))
    assert r.json()["spent_usd"] == f"{spent:.9f}".rstrip("0")

    # One webhook for the crossing, signed; later settlements past the soft limit send none.
    receiver = priced.receiver
    assert receiver is not None

    def ours() -> list[tuple[dict[str, str], bytes]]:
        return [p for p in receiver.posts if orjson.loads(p[1])["budget"]["id"] == budget_id]

    async with asyncio.timeout(20):
        while not ours():
            await receiver.wait_for(len(receiver.posts) + 1)
    await priced.state.money.alerts.deliver_due()  # nothing more is due
    (headers, payload), *more = ours()
    assert not more
    assert verify(WEBHOOK_SECRET, headers["x-llm-api-signature"], payload)
    assert not verify("another-secret", headers["x-llm-api-signature"], payload)
    event: dict[str, Any] = orjson.loads(payload)
    assert event["type"] == "budget.soft_limit_reached"
    assert event["budget"]["scope"] == "team" and event["budget"]["subject_id"] == team_id
    assert float(event["spent_usd"]) >= 0.02
