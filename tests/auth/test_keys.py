"""API keys: shown once, prefixed and checksummed, stored hashed; unknown, revoked and malformed
keys are 401; another user's key is a 404. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib

import openai
import pytest
from sqlalchemy import select

from llm_api.db.tables import ApiKey
from llm_api.services.auth import api_keys
from tests.auth.conftest import AuthEnv
from tests.conftest import MODEL


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_key_format_checksum_and_storage(env: AuthEnv) -> None:
    r = await env.http.post("/v1/keys", json={"name": "ci"}, headers=env.user.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    key = body["key"]
    assert key.startswith("sk-llmapi-") and len(key) == len("sk-llmapi-") + 38
    assert api_keys.well_formed(key)
    assert body["prefix"] == key[:16] and body["name"] == "ci"
    # The database holds the SHA-256 and the display prefix, never the key.
    async with env.app.state.llm_api.db.sessions() as db:
        row = (await db.execute(select(ApiKey).where(ApiKey.id == body["id"]))).scalar_one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in repr(row.__dict__)
    # Listing never shows the key again.
    listed = await env.http.get("/v1/keys", headers=env.user.headers)
    assert body["id"] in listed.text and key not in listed.text and "hash" not in listed.text
    # And the new key works with the openai SDK.
    client = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=env.http, max_retries=0
    )
    assert MODEL in [m.id async for m in client.models.list()]


def test_checksum_catches_typos() -> None:
    key = api_keys.generate()
    typo = key[:-7] + ("A" if key[-7] != "A" else "B") + key[-6:]
    assert api_keys.well_formed(key) and not api_keys.well_formed(typo)


MALFORMED = {
    "sql or": "' OR '1'='1",
    "sql in key shape": "sk-llmapi-' OR 1=1; DROP TABLE api_keys; --",
    "sql union": "sk-llmapi-x' UNION SELECT key_hash FROM api_keys --",
    "10 KB": "sk-llmapi-" + "A" * 10_240,
    "unknown but well formed": api_keys.generate(),
    "bad checksum": api_keys.generate()[:-1] + "0",
    "prefix only": "sk-llmapi-",
    "empty": "",
    "unicode": "sk-llmapi-ÄÖÜ",
    "openai-style": "sk-proj-abcdef",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_and_unknown_keys_are_401(env: AuthEnv, name: str) -> None:
    value = MALFORMED[name]
    headers = {"Authorization": f"Bearer {value}".encode()}
    r = await env.http.get("/v1/models", headers=headers)  # type: ignore[arg-type]
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert value not in r.text or not value


async def test_nul_bytes_and_other_schemes_are_401(env: AuthEnv) -> None:
    # httpx refuses to send a NUL in a header, so drive the ASGI app with a raw scope.
    status = await _raw_get(env, b"Bearer " + env.user.api_key.encode() + b"\x00admin")
    assert status == 401
    for header in [b"Basic " + env.user.api_key.encode(), env.user.api_key.encode(), b"Bearer"]:
        assert await _raw_get(env, header) == 401
    assert await _raw_get(env, b"bearer " + env.user.api_key.encode()) == 200  # scheme is case-free


async def _raw_get(env: AuthEnv, authorization: bytes) -> int:
    sent: list[dict[str, object]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", authorization)],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await env.app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return int(start["status"])  # type: ignore[call-overload]


async def test_revoked_key_is_401_and_other_users_key_is_404(env: AuthEnv) -> None:
    created = (await env.http.post("/v1/keys", headers=env.user.headers)).json()
    key_id, key = created["id"], created["key"]
    assert (await env.http.get("/v1/models", headers=bearer(key))).status_code == 200
    # Another user can neither see nor revoke it: 404, as if it did not exist.
    listed = await env.http.get("/v1/keys", headers=env.other.headers)
    assert key_id not in listed.text
    r = await env.http.delete(f"/v1/keys/{key_id}", headers=env.other.headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert (await env.http.get("/v1/models", headers=bearer(key))).status_code == 200
    # Its owner revokes it; it stops working at once.
    r = await env.http.delete(f"/v1/keys/{key_id}", headers=env.user.headers)
    assert r.status_code == 200 and r.json() == {"id": key_id, "object": "api_key", "deleted": True}
    assert (await env.http.get("/v1/models", headers=bearer(key))).status_code == 401
    again = await env.http.delete(f"/v1/keys/{key_id}", headers=env.user.headers)
    assert again.status_code == 404


async def test_admin_revokes_any_key(env: AuthEnv) -> None:
    created = (await env.http.post("/v1/keys", headers=env.other.headers)).json()
    r = await env.http.delete(f"/v1/admin/keys/{created['id']}", headers=env.user.headers)
    assert r.status_code == 403
    r = await env.http.delete(f"/v1/admin/keys/{created['id']}", headers=env.admin.headers)
    assert r.status_code == 200
    assert (await env.http.get("/v1/models", headers=bearer(created["key"]))).status_code == 401


async def test_key_body_is_strict(env: AuthEnv) -> None:
    body = {"user_id": env.other.user_id}
    r = await env.http.post("/v1/keys", json=body, headers=env.user.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user_id"
