"""Startup refusals (default JWT secret, CORS `*` with credentials, auth off on a public
address), the loopback-only auth-off mode, and 503 (never anonymous) when the database fails."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic import ValidationError

from llm_api.core.config import DEFAULT_JWT_SECRET, Settings
from llm_api.main import create_app
from tests.auth.conftest import AuthEnv
from tests.conftest import MODEL, running_app
from tests.conftest import test_settings as settings_for


@pytest.mark.parametrize("secret", [DEFAULT_JWT_SECRET, "short-secret"])
@pytest.mark.parametrize("environment", ["production", "test"])
def test_default_or_short_jwt_secret_is_refused_outside_development(
    secret: str, environment: str
) -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        Settings(environment=environment, jwt_secret=secret)  # type: ignore[arg-type]
    Settings(environment="development", jwt_secret=secret)  # type: ignore[arg-type]


def test_cors_wildcard_with_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="CORS"):
        Settings(cors_origins=["*"], cors_allow_credentials=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "example.com", "::"])  # noqa: S104
def test_auth_off_is_refused_on_a_public_address(host: str) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        Settings(auth_enabled=False, host=host)
    for loopback in ("127.0.0.1", "localhost", "::1"):
        Settings(auth_enabled=False, host=loopback)


async def test_cors_does_not_reflect_unknown_origins(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, cors_origins=["https://app.example"], cors_allow_credentials=True, warmup=False
    )
    async with running_app(settings) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            pre = {"Access-Control-Request-Method": "POST"}
            evil = await c.options("/v1/models", headers={"Origin": "https://evil.example", **pre})
            good = await c.options("/v1/models", headers={"Origin": "https://app.example", **pre})
    assert "access-control-allow-origin" not in evil.headers
    assert good.headers["access-control-allow-origin"] == "https://app.example"


async def test_auth_off_serves_loopback_callers_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, auth_enabled=False, warmup=False)
    app = create_app(settings)  # configures logging (replaces root handlers) ...
    logging.getLogger().addHandler(caplog.handler)  # ... so listen after it
    async with LifespanManager(app, startup_timeout=120):
        assert "AUTHENTICATION IS DISABLED" in caplog.text
        while not app.state.llm_api.llm.ready:
            await asyncio.sleep(0.1)
        local = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=local, base_url="http://127.0.0.1") as c:
            assert (await c.get("/v1/models")).status_code == 200
            r = await c.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
            )
            assert r.status_code == 200
            assert (await c.get("/v1/keys")).status_code == 401  # account routes need an account
        remote = httpx.ASGITransport(app=app, client=("203.0.113.9", 5000))
        async with httpx.AsyncClient(transport=remote, base_url="http://127.0.0.1") as c:
            assert (await c.get("/v1/models")).status_code == 401


async def test_database_failure_is_503_never_anonymous(tmp_path: Path, env: AuthEnv) -> None:
    if env.kind != "sqlite":
        pytest.skip("one database is enough: the failure is injected by closing the engine")
    # Cache of verified keys and the outage grace period off: every request needs the database
    # here (a key verified within the grace period keeps working: test_database_outage).
    settings = settings_for(
        tmp_path, warmup=False, api_key_cache_seconds=0, api_key_outage_grace_seconds=0
    )
    async with running_app(settings) as app:
        state = app.state.llm_api
        from tests.conftest import create_account

        acct = await create_account(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.get("/v1/models", headers=acct.headers)).status_code == 200
            # Point the engine at a file that cannot be opened: every connection now fails.
            from llm_api.db.engine import Database

            good = state.db
            state.db = Database.from_settings(
                settings, f"sqlite+aiosqlite:///{tmp_path}/missing-dir/nope/x.db"
            )
            try:
                r = await c.get("/v1/models", headers=acct.headers)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["type"] == "server_error"
                assert "sqlite" not in r.text.lower() and str(tmp_path) not in r.text
                r = await c.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    headers=acct.headers,
                )
                assert r.status_code == 503
                assert (await c.get("/v1/models")).status_code == 401
            finally:
                await state.db.dispose()
                state.db = good
