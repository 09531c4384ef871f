"""Secrets stay secret: a canary password, API key and tokens never appear in captured logs,
error bodies, a live server's log file, or the database in clear. Also: the openai SDK works
against a live server with a key made by the `llm-api` CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import text

from llm_api.db.tables import Base
from llm_api.services.auth.tokens import REFRESH_PREFIX
from tests.auth.conftest import CANARY_PASSWORD, AuthEnv
from tests.conftest import MODEL, start_live_server


async def _exercise(http: httpx.AsyncClient, email: str, password: str, key: str) -> list[str]:
    """Successful and failing calls carrying the secrets; returns every response body."""
    bodies: list[str] = []

    async def call(method: str, url: str, **kw: object) -> httpx.Response:
        r = await http.request(method, url, **kw)  # type: ignore[arg-type]
        bodies.append(r.text)
        return r

    ok = await call("POST", "/v1/auth/token", data={"username": email, "password": password})
    assert ok.status_code == 200
    tokens = ok.json()
    bodies.pop()  # this body carries fresh tokens by design; the tokens are checked below
    await call("POST", "/v1/auth/token", data={"username": email, "password": password + "x"})
    await call("POST", "/v1/auth/token", data={"username": password, "password": password})
    await call("POST", "/v1/auth/token", data={"username": email, "password": password * 100})
    auth = {"Authorization": f"Bearer {key}"}
    await call("GET", "/v1/models", headers=auth)
    await call("GET", "/v1/models", headers={"Authorization": f"Bearer {key}x"})
    await call("GET", "/v1/models", headers={"Authorization": f"Bearer {key[:-1]}"})
    await call("GET", "/v1/models", headers={"Authorization": f"Basic {key}"})
    # (A key pasted into a URL or a body field is echoed like any client text; not tested.)
    await call("POST", "/v1/chat/completions", json={"model": "nope", "messages": []}, headers=auth)
    await call(
        "POST", "/v1/admin/users", json={"email": "z@e.com", "password": password}, headers=auth
    )
    await call("POST", "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    bodies.pop()
    await call("POST", "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    await call(
        "GET", "/v1/users/me", headers={"Authorization": f"Bearer {tokens['access_token']}x"}
    )
    return [tokens["access_token"], tokens["refresh_token"], *bodies]


async def test_canaries_never_reach_logs_bodies_or_the_database(
    env: AuthEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = env.user.api_key
    access, refresh, *bodies = await _exercise(env.http, env.user.email, CANARY_PASSWORD, key)
    secrets = [CANARY_PASSWORD, key, key[16:], access, refresh]
    for body in bodies:
        for secret in secrets:
            assert secret not in body, body
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert caplog.records, "nothing was logged: the check would prove nothing"
    for secret in secrets:
        assert secret not in logged
    # The database: dump every row of every table as text.
    dump = []
    async with env.app.state.llm_api.db.sessions() as db:
        for table in Base.metadata.sorted_tables:
            rows = await db.execute(text(f'SELECT * FROM "{table.name}"'))  # noqa: S608
            dump.extend(repr(tuple(row)) for row in rows)
    dumped = "\n".join(dump)
    assert env.user.email in dumped  # proves the dump saw the accounts
    # The random part alone too (token_urlsafe may itself contain "-", so not split("-")).
    for secret in [CANARY_PASSWORD, key, key[16:], refresh, refresh.removeprefix(REFRESH_PREFIX)]:
        assert secret not in dumped


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "llm_api.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout


async def test_live_server_with_cli_made_key_and_clean_log(session_tmp: Path) -> None:
    data = session_tmp / "auth-live"
    data.mkdir(parents=True, exist_ok=True)
    cli_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(data),
    }
    email = "canary@example.com"
    out = _cli(cli_env, "users", "create", email, "--password-stdin", stdin=CANARY_PASSWORD + "\n")
    assert email in out and CANARY_PASSWORD not in out
    key = _cli(cli_env, "keys", "create", email).strip().splitlines()[-1]
    assert key.startswith("sk-llmapi-")
    server = start_live_server(data, env={"LLM_API_LOG_LEVEL": "DEBUG"})
    try:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=server.base_url + "/v1", api_key=key + "x", max_retries=0
            ).models.list()
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            access, refresh, *bodies = await _exercise(http, email, CANARY_PASSWORD, key)
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    assert len(log) > 200, "the server logged nothing: the check would prove nothing"
    for secret in [CANARY_PASSWORD, key, key[16:], access, refresh]:
        assert secret not in log
        for body in bodies:
            assert secret not in body
