"""Authorization: admin-only routes (403), paid-tier models (402), mass assignment (400) and
responses without hashes. On SQLite and PostgreSQL."""

from __future__ import annotations

import openai
import pytest

from tests.auth.conftest import PAID_MODEL, AuthEnv
from tests.conftest import MODEL, create_account

ADMIN_CALLS = [
    ("GET", "/v1/admin/users", None),
    ("POST", "/v1/admin/users", {"email": "x@example.com", "password": "long-enough-pw"}),
    ("GET", "/v1/admin/users/abc", None),
    ("PATCH", "/v1/admin/users/abc", {"tier": "paid"}),
    ("DELETE", "/v1/admin/keys/abc", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
async def test_admin_routes_are_403_for_users_and_401_without_credentials(
    env: AuthEnv, method: str, path: str, body: dict[str, str] | None
) -> None:
    for who in (env.user, env.paid):
        r = await env.http.request(method, path, json=body, headers=who.headers)
        assert r.status_code == 403, (who.email, r.text)
        assert r.json()["error"]["type"] == "permission_error"
    r = await env.http.request(method, path, json=body)
    assert r.status_code == 401
    # Path tricks do not reach the admin routes either.
    for variant in (path.replace("/v1/admin", "//v1/admin"), path.replace("/admin", "/ADMIN")):
        r = await env.http.request(method, variant, json=body, headers=env.user.headers)
        assert r.status_code in (401, 403, 404), (variant, r.status_code)


async def test_admin_manages_users(env: AuthEnv) -> None:
    email = f"made-by-admin-{env.kind}@example.com"
    r = await env.http.post(
        "/v1/admin/users",
        json={"email": email.upper(), "password": "a-long-password", "tier": "paid"},
        headers=env.admin.headers,
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["email"] == email and made["tier"] == "paid" and made["role"] == "user"
    assert "password" not in r.text and "argon2" not in r.text
    dup = await env.http.post(
        "/v1/admin/users",
        json={"email": email, "password": "a-long-password"},
        headers=env.admin.headers,
    )
    assert dup.status_code == 409
    short = await env.http.post(
        "/v1/admin/users",
        json={"email": "s@example.com", "password": "short"},
        headers=env.admin.headers,
    )
    assert short.status_code == 400
    bad = await env.http.post(
        "/v1/admin/users",
        json={"email": "not-an-email", "password": "a-long-password"},
        headers=env.admin.headers,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "email"
    listed = await env.http.get("/v1/admin/users?limit=500", headers=env.admin.headers)
    assert email in listed.text and "argon2" not in listed.text
    # An offset beyond SQL's 64-bit OFFSET is a 400, not a database error (found by schemathesis).
    huge = await env.http.get(f"/v1/admin/users?offset={10**28}", headers=env.admin.headers)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "offset"
    r = await env.http.patch(
        f"/v1/admin/users/{made['id']}", json={"tier": "free"}, headers=env.admin.headers
    )
    assert r.json()["tier"] == "free"
    r = await env.http.patch(
        f"/v1/admin/users/{made['id']}", json={"password_hash": "x"}, headers=env.admin.headers
    )
    assert r.status_code == 400
    assert (
        await env.http.get("/v1/admin/users/nope", headers=env.admin.headers)
    ).status_code == 404
    # An admin cannot lock themselves out.
    r = await env.http.patch(
        f"/v1/admin/users/{env.admin.user_id}", json={"is_active": False}, headers=env.admin.headers
    )
    assert r.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"role": "admin"},
        {"tier": "paid"},
        {"display_name": "ok", "role": "admin"},
        {"is_active": True},
        {"email": "takeover@example.com"},
        {"password_hash": "$argon2id$..."},
        {"id": "someone-else"},
    ],
)
async def test_mass_assignment_is_refused(env: AuthEnv, body: dict[str, str]) -> None:
    r = await env.http.patch("/v1/users/me", json=body, headers=env.user.headers)
    assert r.status_code == 400, r.text
    me = (await env.http.get("/v1/users/me", headers=env.user.headers)).json()
    assert me["role"] == "user" and me["tier"] == "free" and me["email"] == env.user.email


async def test_user_updates_own_profile_only(env: AuthEnv) -> None:
    r = await env.http.patch("/v1/users/me", json={"display_name": "Ada"}, headers=env.user.headers)
    assert r.status_code == 200 and r.json()["display_name"] == "Ada"
    other = (await env.http.get("/v1/users/me", headers=env.other.headers)).json()
    assert other["id"] == env.other.user_id and other["display_name"] is None
    assert "hash" not in r.text


def _client(env: AuthEnv, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=env.http, max_retries=0
    )


async def test_paid_model_is_402_for_free_users_and_served_to_paid_users(env: AuthEnv) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    with pytest.raises(openai.APIStatusError) as err:
        await _client(env, env.user.api_key).chat.completions.create(
            model=PAID_MODEL,
            messages=messages,
            max_tokens=4,  # type: ignore[arg-type]
        )
    assert err.value.status_code == 402
    body = err.value.body
    assert isinstance(body, dict)
    assert body["message"] == "Paid subscription required"
    assert body["param"] == "model" and isinstance(body["code"], str)
    # Legacy completions and the simple API are gated the same way.
    r = await env.http.post(
        "/v1/completions",
        json={"model": PAID_MODEL, "prompt": "hi", "max_tokens": 2},
        headers=env.user.headers,
    )
    assert r.status_code == 402
    # A paid user is served; the free model serves everyone.
    reply = await _client(env, env.paid.api_key).chat.completions.create(
        model=PAID_MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content is not None
    free = await _client(env, env.user.api_key).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert free.usage is not None


async def test_tier_change_applies_to_the_next_request(env: AuthEnv) -> None:
    upgraded = await create_account(env.app)
    body = {"model": PAID_MODEL, "prompt": "hi", "max_tokens": 1}
    r = await env.http.post("/v1/completions", json=body, headers=upgraded.headers)
    assert r.status_code == 402
    await env.http.patch(
        f"/v1/admin/users/{upgraded.user_id}", json={"tier": "paid"}, headers=env.admin.headers
    )
    r = await env.http.post("/v1/completions", json=body, headers=upgraded.headers)
    assert r.status_code == 200, r.text
