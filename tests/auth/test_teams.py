"""Teams (issue 26, point 2): roles (owner, admin, member), outsiders see 404, team keys carry
the team on their principal and outlive the member who made them, members see the team's keys
and usage, and the `teams` scope guards the routes. On SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai

from llm_api.services.auth import api_keys
from tests.auth.conftest import AuthEnv
from tests.conftest import MODEL, Account, create_account


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Team:
    id: str
    owner: Account
    admin: Account
    member: Account
    outsider: Account


async def make_team(env: AuthEnv) -> Team:
    owner, admin, member, outsider = [await create_account(env.app) for _ in range(4)]
    r = await env.http.post("/v1/teams", json={"name": "Research"}, headers=owner.headers)
    assert r.status_code == 201, r.text
    team_id = r.json()["id"]
    assert r.json()["role"] == "owner"
    for account, role in ((admin, "admin"), (member, None)):
        body = {"role": role} if role else None
        r = await env.http.post(
            f"/v1/teams/{team_id}/members/{account.email}", json=body, headers=owner.headers
        )
        assert r.status_code == 201, r.text
        assert r.json()["role"] == (role or "member")
    return Team(team_id, owner, admin, member, outsider)


async def test_roles_and_outsiders(env: AuthEnv) -> None:
    team = await make_team(env)
    base = f"/v1/teams/{team.id}"
    # Every member sees the team, its members and keys; the caller's role comes with it.
    for account, role in ((team.owner, "owner"), (team.admin, "admin"), (team.member, "member")):
        r = await env.http.get(base, headers=account.headers)
        assert r.status_code == 200 and r.json()["role"] == role, r.text
        assert len(r.json()["members"]) == 3
        listed = (await env.http.get("/v1/teams", headers=account.headers)).json()["data"]
        assert [t["id"] for t in listed] == [team.id]
    # Outsiders: 404 everywhere, never a 403 that says the team exists; same as no team at all.
    outsider_calls: list[tuple[str, str, Any]] = [
        ("GET", base, None),
        ("PATCH", base, {"name": "x"}),
        ("DELETE", base, None),
        ("GET", f"{base}/members", None),
        ("POST", f"{base}/members/{team.outsider.email}", None),
        ("DELETE", f"{base}/members/{team.member.user_id}", None),
        ("GET", f"{base}/keys", None),
        ("POST", f"{base}/keys", {}),
        ("GET", f"{base}/usage", None),
        ("POST", "/v1/keys", {"team_id": team.id}),
    ]
    for method, path, body in outsider_calls:
        r = await env.http.request(method, path, json=body, headers=team.outsider.headers)
        assert r.status_code == 404, (method, path, r.text)
        missing = path.replace(team.id, "nosuchteam")
        body = {"team_id": "nosuchteam"} if body == {"team_id": team.id} else body
        gone = await env.http.request(method, missing, json=body, headers=team.outsider.headers)
        assert gone.json()["error"]["message"] == r.json()["error"]["message"]
    # A member may not manage; an admin manages members but not owners.
    r = await env.http.post(f"{base}/members/{team.outsider.email}", headers=team.member.headers)
    assert r.status_code == 403
    r = await env.http.post(f"{base}/keys", json={}, headers=team.member.headers)
    assert r.status_code == 403
    r = await env.http.patch(
        f"{base}/members/{team.member.user_id}", json={"role": "owner"}, headers=team.admin.headers
    )
    assert r.status_code == 403
    r = await env.http.delete(f"{base}/members/{team.owner.user_id}", headers=team.admin.headers)
    assert r.status_code == 403
    r = await env.http.delete(base, headers=team.admin.headers)
    assert r.status_code == 403  # only owners delete
    r = await env.http.patch(base, json={"name": "Renamed"}, headers=team.admin.headers)
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    # The last owner cannot leave or be demoted; a member may leave.
    r = await env.http.delete(f"{base}/members/{team.owner.user_id}", headers=team.owner.headers)
    assert r.status_code == 409
    r = await env.http.delete(f"{base}/members/{team.member.user_id}", headers=team.member.headers)
    assert r.status_code == 200
    assert (await env.http.get(base, headers=team.member.headers)).status_code == 404
    # The owner deletes the team: it is gone for everyone.
    assert (await env.http.delete(base, headers=team.owner.headers)).status_code == 200
    assert (await env.http.get(base, headers=team.owner.headers)).status_code == 404


async def test_team_key_outlives_its_creator_and_shows_team_usage(env: AuthEnv) -> None:
    team = await make_team(env)
    base = f"/v1/teams/{team.id}"
    r = await env.http.post(
        f"{base}/keys", json={"name": "svc", "models": [MODEL]}, headers=team.admin.headers
    )
    assert r.status_code == 201, r.text
    made = r.json()
    key, key_id = made["key"], made["id"]
    assert made["team_id"] == team.id
    # A team key is the team's: listed with it (for every member), not as the creator's own.
    seen = (await env.http.get(f"{base}/keys", headers=team.member.headers)).json()["data"]
    assert [k["id"] for k in seen] == [key_id] and key not in str(seen)
    mine = (await env.http.get("/v1/keys", headers=team.admin.headers)).json()["data"]
    assert key_id not in [k["id"] for k in mine]
    # Its principal carries the team.
    client = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=env.http, max_retries=0
    )
    await client.completions.create(model=MODEL, prompt="a", max_tokens=1)
    async with env.app.state.llm_api.db.sessions() as db:
        principal = await env.app.state.llm_api.auth.authenticator.authenticate(db, key)
    assert principal.team_id == team.id and principal.tenant == f"team:{team.id}"
    # Team usage = usage of the team's keys; every member sees it, outsiders do not.
    assert await env.app.state.llm_api.usage.flusher.flush_once()
    usage = await env.http.get(f"{base}/usage", headers=team.member.headers)
    assert usage.status_code == 200 and usage.json()["totals"]["requests"] == 1, usage.text
    # The creator leaves the team: the key keeps working; they can no longer manage it.
    r = await env.http.delete(f"{base}/members/{team.admin.email}", headers=team.owner.headers)
    assert r.status_code == 200
    assert [m.id async for m in client.models.list()] == [MODEL]
    for method in ("PATCH", "DELETE"):
        r = await env.http.request(
            method, f"/v1/keys/{key_id}", json={"name": "x"}, headers=team.admin.headers
        )
        assert r.status_code == 404, r.text
    # The owner still manages it: PATCH applies at once, revoking stops it.
    r = await env.http.patch(
        f"/v1/keys/{key_id}", json={"models": ["none"]}, headers=team.owner.headers
    )
    assert r.status_code == 200
    assert [m.id async for m in client.models.list()] == []
    assert (await env.http.delete(f"/v1/keys/{key_id}", headers=team.owner.headers)).is_success
    assert (await env.http.get("/v1/models", headers=bearer(key))).status_code == 401


async def test_teams_scope_and_admin_listing(env: AuthEnv) -> None:
    team = await make_team(env)
    async with env.app.state.llm_api.db.sessions.begin() as db:
        _, inference_only = await api_keys.create_key(db, team.owner.user_id, "x", ["inference"])
    r = await env.http.get("/v1/teams", headers=bearer(inference_only))
    assert r.status_code == 403 and "teams" in r.json()["error"]["message"]
    assert (await env.http.get("/v1/admin/teams", headers=team.owner.headers)).status_code == 403
    listed = await env.http.get("/v1/admin/teams", params={"limit": 500}, headers=env.admin.headers)
    assert listed.status_code == 200
    found = next(t for t in listed.json()["data"] if t["id"] == team.id)
    assert {m["email"] for m in found["members"]} == {
        team.owner.email,
        team.admin.email,
        team.member.email,
    }
