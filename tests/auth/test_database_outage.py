"""A PostgreSQL outage does not stop serving: API keys verified within the outage grace period
keep working (services/auth/key_cache.py), everything else gets 503, and a revocation made during
the outage applies as soon as the database is back.

The outage is real: the app reaches PostgreSQL through a TCP relay this test owns, and the relay
is shut (listener and every open connection) while PostgreSQL itself keeps running, so the test
can revoke a key behind the app's back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import (
    MODEL,
    create_account,
    free_port,
    postgres_database,
    require_service,
    running_app,
)
from tests.conftest import test_settings as settings_for

APP = {"db_auto_migrate": True, "warmup": False}


class Relay:
    """A TCP relay to PostgreSQL that can be cut and restored on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def relayed_database() -> AsyncIterator[tuple[str, str, Relay]]:
    """(URL through the relay, direct asyncpg DSN, relay)."""
    async with postgres_database() as url:
        relay = Relay(free_port())
        await relay.start()
        try:
            relayed = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
            direct = url.replace("postgresql+asyncpg", "postgresql")
            yield relayed, direct, relay
        finally:
            with contextlib.suppress(AssertionError):
                await relay.cut()


async def test_known_keys_ride_out_a_database_outage(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with relayed_database() as (url, direct, relay):
        settings = settings_for(
            tmp_path,
            database_url=url,
            **APP,
            api_key_cache_seconds=5,
            api_key_outage_grace_seconds=600,
        )
        async with running_app(settings) as app:
            known, unknown = await create_account(app), await create_account(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

                async def models(headers: dict[str, str]) -> int:
                    return (await http.get("/v1/models", headers=headers)).status_code

                async def complete(headers: dict[str, str]) -> int:
                    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
                    r = await http.post("/v1/completions", json=body, headers=headers)
                    return r.status_code

                r = await http.post(
                    "/v1/auth/token", data={"username": known.email, "password": known.password}
                )
                assert r.status_code == 200, r.text
                jwt = {"Authorization": f"Bearer {r.json()['access_token']}"}

                assert await models(known.headers) == 200  # verified against the database
                cache = app.state.llm_api.auth.authenticator.keys
                cache.ttl = 0  # its 5 s of database-free trust are over: the next read is real

                await relay.cut()
                statuses = [await complete(known.headers) for _ in range(20)]
                assert statuses == [200] * 20  # was 503 for every one before the grace period
                assert await models(unknown.headers) == 503  # never verified: needs the database
                assert await models(jwt) == 503  # a JWT's login is checked in the database

                # Revoked behind the app's back while the app cannot see the database.
                conn = await asyncpg.connect(direct)
                try:
                    await conn.execute(
                        "UPDATE api_keys SET revoked_at = now() WHERE id = $1", known.key_id
                    )
                finally:
                    await conn.close()
                assert await models(known.headers) == 200  # still the outage: grace applies

                await relay.start()
                # Back: within one retry interval (1 s) the next lookup reads the row again.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while (status := await models(known.headers)) == 200 and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                assert status == 401
                assert await models(unknown.headers) == 200


async def test_no_grace_period_means_503_during_an_outage(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with relayed_database() as (url, _direct, relay):
        settings = settings_for(tmp_path, database_url=url, **APP, api_key_outage_grace_seconds=0)
        async with running_app(settings) as app:
            known = await create_account(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/v1/models", headers=known.headers)).status_code == 200
                app.state.llm_api.auth.authenticator.keys.ttl = 0
                await relay.cut()
                r = await http.get("/v1/models", headers=known.headers)
                assert r.status_code == 503
                assert r.json()["error"]["type"]


@pytest.mark.parametrize("grace", [0.0, 60.0])
def test_the_grace_period_never_outlives_its_setting(grace: float) -> None:
    from llm_api.services.auth.key_cache import ApiKeyCache

    cache: ApiKeyCache[str] = ApiKeyCache(0.0, outage_grace=grace)
    cache.put("digest", "principal", cache.generation)
    assert cache.get("digest") is None  # no TTL: never trusted without the database
    assert cache.during_outage("digest") == ("principal" if grace else None)
