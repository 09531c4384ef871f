"""API key scopes (docs/security.md, "API key scopes"): new keys are inference-only; managing
keys, the account or the server needs a key created with that scope or a password login; a key
never grants what its creator lacks; every /v1 route declares its scope; keys made before
scopes are migrated to inference-only. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute

from llm_api.api.scopes import required_scope
from llm_api.api.security import _PUBLIC_ENDPOINTS, authenticate
from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.services.auth import api_keys
from tests.auth.conftest import AuthEnv, _database
from tests.conftest import MODEL, create_account, running_app
from tests.conftest import test_settings as settings_for


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_key(env: AuthEnv, headers: dict[str, str], **body: Any) -> httpx.Response:
    return await env.http.post("/v1/keys", json={"name": "scoped", **body}, headers=headers)


async def password_login(env: AuthEnv, email: str, password: str) -> dict[str, str]:
    r = await env.http.post("/v1/auth/token", data={"username": email, "password": password})
    assert r.status_code == 200, r.text
    return bearer(r.json()["access_token"])


def assert_missing(r: httpx.Response, scope: str) -> None:
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's error shape
    assert error["type"] == "permission_error" and error["code"] == "missing_scope"
    assert f"Missing scope: {scope}." in error["message"]


async def test_a_new_key_is_inference_only(env: AuthEnv) -> None:
    created = await new_key(env, env.user.headers)
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == ["inference"]
    key = created.json()["key"]
    listed = (await env.http.get("/v1/keys", headers=env.user.headers)).json()["data"]
    assert {k["id"]: k["scopes"] for k in listed}[created.json()["id"]] == ["inference"]

    # Inference works with the openai SDK: models, a completion, files, batches.
    client = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=env.http, max_retries=0
    )
    assert MODEL in [m.id async for m in client.models.list()]
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    assert (await client.files.list()).data is not None
    assert (await client.batches.list()).data is not None
    # And one's own usage and rate-limit standing.
    for path in ["/v1/usage", "/v1/users/me/limits"]:
        assert (await env.http.get(path, headers=bearer(key))).status_code == 200, path

    # Nothing else: a leaked inference key can neither mint a spare nor touch the account.
    assert_missing(await new_key(env, bearer(key)), "keys")
    assert_missing(await env.http.get("/v1/keys", headers=bearer(key)), "keys")
    assert_missing(
        await env.http.delete(f"/v1/keys/{env.user.key_id}", headers=bearer(key)), "keys"
    )
    assert_missing(await env.http.get("/v1/users/me", headers=bearer(key)), "account")
    patch = await env.http.patch("/v1/users/me", json={"display_name": "x"}, headers=bearer(key))
    assert_missing(patch, "account")
    put = await env.http.put("/v1/conversation-log", json={"enabled": False}, headers=bearer(key))
    assert_missing(put, "account")
    assert_missing(await env.http.post("/v1/auth/logout", headers=bearer(key)), "account")
    # The SDK sees the 403 as PermissionDeniedError with the message.
    with pytest.raises(openai.PermissionDeniedError, match="Missing scope: keys"):
        await client.get("/keys", cast_to=object)


async def test_a_key_never_grants_more_than_its_creator_holds(env: AuthEnv) -> None:
    manager = await new_key(env, env.user.headers, scopes=["inference", "keys"])
    assert manager.status_code == 201 and manager.json()["scopes"] == ["inference", "keys"]
    manager_key = bearer(manager.json()["key"])
    # It manages keys, within its own scopes...
    narrower = await new_key(env, manager_key, scopes=["keys"])
    assert narrower.status_code == 201 and narrower.json()["scopes"] == ["keys"]
    assert (await env.http.get("/v1/keys", headers=manager_key)).status_code == 200
    # ... but cannot mint a broader key.
    for wanted in (["account"], ["inference", "keys", "account"], ["admin"]):
        r = await new_key(env, manager_key, scopes=wanted)
        assert r.status_code == 403, (wanted, r.text)
        assert r.json()["error"]["code"] == "scope_not_grantable"
        assert wanted[-1] in r.json()["error"]["message"]
    # A keys-only key cannot run inference.
    narrow = bearer(narrower.json()["key"])
    r = await env.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        headers=narrow,
    )
    assert_missing(r, "inference")
    # Revoking with a keys key works (it is its own account's key).
    revoked = await env.http.delete(f"/v1/keys/{narrower.json()['id']}", headers=manager_key)
    assert revoked.status_code == 200


async def test_admin_scope_is_for_administrators_only(env: AuthEnv) -> None:
    user_login = await password_login(env, env.user.email, env.user.password)
    r = await new_key(env, user_login, scopes=["admin"])
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]

    admin_login = await password_login(env, env.admin.email, env.admin.password)
    inference_only = await new_key(env, admin_login)
    assert inference_only.status_code == 201
    # An admin's default key is not an admin key.
    r = await env.http.get("/v1/admin/users", headers=bearer(inference_only.json()["key"]))
    assert_missing(r, "admin")
    admin_key = await new_key(env, admin_login, scopes=["inference", "admin"])
    assert admin_key.status_code == 201, admin_key.text
    r = await env.http.get("/v1/admin/users", headers=bearer(admin_key.json()["key"]))
    assert r.status_code == 200
    # The admin scope does not carry the others.
    assert_missing(await new_key(env, bearer(admin_key.json()["key"])), "keys")


async def test_a_demoted_administrators_key_loses_the_admin_scope(env: AuthEnv) -> None:
    former = await create_account(env.app, role="admin")  # its key holds every scope
    assert (await env.http.get("/v1/admin/users", headers=former.headers)).status_code == 200
    demote = await env.http.patch(
        f"/v1/admin/users/{former.user_id}", json={"role": "user"}, headers=env.admin.headers
    )
    assert demote.status_code == 200, demote.text
    assert_missing(await env.http.get("/v1/admin/users", headers=former.headers), "admin")
    r = await new_key(env, former.headers, scopes=["inference", "admin"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "scope_not_grantable"
    assert (await new_key(env, former.headers, scopes=["inference"])).status_code == 201


async def test_a_password_login_holds_every_scope_of_its_role(env: AuthEnv) -> None:
    login = await password_login(env, env.user.email, env.user.password)
    assert (await env.http.get("/v1/users/me", headers=login)).status_code == 200
    created = await new_key(env, login, scopes=["inference", "keys", "account"])
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == ["inference", "keys", "account"]
    full = bearer(created.json()["key"])
    assert (await env.http.get("/v1/users/me", headers=full)).status_code == 200
    assert (await env.http.get("/v1/admin/users", headers=login)).status_code == 403


@pytest.mark.parametrize("scopes", [[], ["everything"], ["inference", "root"], "inference"])
async def test_unknown_or_empty_scopes_are_400(env: AuthEnv, scopes: Any) -> None:
    r = await new_key(env, env.user.headers, scopes=scopes)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def _v1_routes(app: Any) -> list[tuple[str, Any]]:
    """(path, endpoint) of every /v1 route, including those of included routers (FastAPI >=
    0.13x keeps them as route contexts whose `original_route` is the APIRoute)."""
    found = []
    for route in app.routes:
        contexts = (
            list(route.effective_route_contexts())
            if hasattr(route, "effective_route_contexts")
            else [route]
        )
        for ctx in contexts:
            original = getattr(ctx, "original_route", ctx)
            if isinstance(original, APIRoute) and ctx.path.startswith("/v1/"):
                found.append((ctx.path, original.endpoint))
    return found


async def test_every_v1_route_declares_a_scope(env: AuthEnv) -> None:
    routes = _v1_routes(env.app)
    assert len(routes) > 30 and "/v1/chat/completions" in {p for p, _ in routes}
    undeclared = [
        path
        for path, endpoint in routes
        if endpoint not in _PUBLIC_ENDPOINTS and required_scope(endpoint) is None
    ]
    assert not undeclared, f"declare a scope with @requires_scope: {undeclared}"


async def test_a_route_without_a_scope_is_refused_to_every_key(env: AuthEnv) -> None:
    """Deny by default: a route someone forgot to declare is closed to keys, even full ones."""
    router = APIRouter()
    path = f"/forgot-{uuid.uuid4().hex[:8]}"

    @router.get(path)
    async def forgot() -> dict[str, bool]:
        return {"ok": True}

    before = list(env.app.router.routes)
    env.app.include_router(router, prefix="/v1", dependencies=[Depends(authenticate)])
    try:
        r = await env.http.get(f"/v1{path}", headers=env.admin.headers)  # every admin scope
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
        assert "declares no API key scope" in r.json()["error"]["message"]
        login = await password_login(env, env.admin.email, env.admin.password)
        assert (await env.http.get(f"/v1{path}", headers=login)).status_code == 200
    finally:
        env.app.router.routes[:] = before


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_api.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
    )


async def test_cli_creates_scoped_keys(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
    }
    made = _cli(
        env, "users", "create", "cli@example.com", "--password-stdin", stdin="pw-long-enough\n"
    )
    assert made.returncode == 0, made.stderr
    plain = _cli(env, "keys", "create", "cli@example.com")
    assert plain.returncode == 0 and "with scopes inference;" in plain.stdout
    scoped = _cli(env, "keys", "create", "cli@example.com", "--scope", "inference,keys")
    assert scoped.returncode == 0 and "with scopes inference,keys;" in scoped.stdout
    for bad, says in (("admin", "only for administrators"), ("root", "unknown scope root")):
        refused = _cli(env, "keys", "create", "cli@example.com", "--scope", bad)
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr
    db = Database.from_settings(settings_for(tmp_path))
    try:
        async with db.engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT scopes FROM api_keys"))).scalars().all()
    finally:
        await db.dispose()
    assert sorted(rows) == ["inference", "inference keys"]  # a refused key is never stored


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_keys_made_before_scopes_become_inference_only(kind: str, tmp_path: Path) -> None:
    """Migration 0004 on a database holding an administrator's key from before scopes: after
    the upgrade the key still runs inference, and nothing else."""
    raw = api_keys.generate()
    async with _database(kind) as url:
        settings = settings_for(tmp_path, warmup=False, database_url=url, db_auto_migrate=True)
        db = Database.from_settings(settings, url)
        try:
            await migrate.upgrade(db.engine, "0003_batches")
            async with db.engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "INSERT INTO users (id, email, password_hash, tier, role, is_active,"
                        " created_at, updated_at) VALUES ('u1', 'old-admin@example.com', 'x',"
                        " 'paid', 'admin', :yes, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"yes": True},
                )
                await conn.execute(
                    sa.text(
                        "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at)"
                        " VALUES ('k1', 'u1', 'old', :prefix, :hash, CURRENT_TIMESTAMP)"
                    ),
                    {"prefix": api_keys.display_prefix(raw), "hash": api_keys.digest(raw)},
                )
        finally:
            await db.dispose()

        async with running_app(settings) as app:  # migrates to head at start
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                client = openai.AsyncOpenAI(
                    base_url="http://testserver/v1", api_key=raw, http_client=c, max_retries=0
                )
                assert MODEL in [m.id async for m in client.models.list()]
                assert_missing(await c.get("/v1/keys", headers=bearer(raw)), "keys")
                assert_missing(await c.get("/v1/admin/users", headers=bearer(raw)), "admin")
                assert_missing(await c.post("/v1/keys", headers=bearer(raw)), "keys")
            async with app.state.llm_api.db.sessions() as session:
                stored = await session.scalar(sa.text("SELECT scopes FROM api_keys"))
            assert stored == "inference"
