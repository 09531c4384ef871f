"""LLM_API_AUTH_ENABLED=false serves keyless requests only to a direct local caller: a request
relayed by a proxy on the same host (any forwarding header), or naming another host (DNS
rebinding), is a 401. And the keyless caller is its own `anonymous` tier, not a paid user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from llm_api.main import create_app
from tests.auth.conftest import PAID_MODEL, write_registry
from tests.conftest import MODEL, running_app
from tests.conftest import test_settings as settings_for

RELAYED = [
    {"X-Forwarded-For": "203.0.113.9"},
    {"Forwarded": "for=203.0.113.9;proto=https"},
    {"X-Real-IP": "203.0.113.9"},
    {"Via": "1.1 nginx"},
    {"X-Forwarded-Proto": "https"},
    {"X-Forwarded-Host": "api.example.com"},
    {"True-Client-IP": "203.0.113.9"},
]


@pytest.fixture(scope="module")
async def keyless_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    tmp = tmp_path_factory.mktemp("keyless")
    settings = settings_for(
        tmp,
        auth_enabled=False,
        models_file=write_registry(tmp / "models.yaml"),
        warmup=False,
        cache_enabled=False,
        rate_limit_enabled=True,
    )
    async with running_app(settings) as app:
        yield app


async def _drop_auth(request: httpx.Request) -> None:
    request.headers.pop("Authorization", None)  # the SDK always sends its api_key


def local_client(app: Any) -> httpx.AsyncClient:
    """A client on this machine (peer 127.0.0.1), sending no credentials."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://127.0.0.1:8000",
        timeout=120,
        event_hooks={"request": [_drop_auth]},
    )


def sdk(http: httpx.AsyncClient, headers: dict[str, str] | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://127.0.0.1:8000/v1",
        api_key="unused",
        http_client=http,
        max_retries=0,
        default_headers=headers,
    )


@pytest.mark.parametrize("headers", RELAYED, ids=lambda h: next(iter(h)))
async def test_a_relayed_request_gets_no_keyless_access(
    keyless_app: Any, headers: dict[str, str]
) -> None:
    async with local_client(keyless_app) as http:
        assert (await http.get("/v1/models")).status_code == 200  # direct: served
        r = await http.get("/v1/models", headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["type"] == "authentication_error"
        assert "proxy" in error["message"]
        # The openai SDK through the same proxy: refused, nothing generated.
        with pytest.raises(openai.AuthenticationError):
            await sdk(http, headers).completions.create(model=MODEL, prompt="hi", max_tokens=1)


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("localhost:8000", True),
        ("127.0.0.1", True),
        ("[::1]:8000", True),
        ("evil.example:8000", False),  # a page whose name was re-pointed at 127.0.0.1
        ("", False),
    ],
)
async def test_the_host_must_name_this_machine(keyless_app: Any, host: str, served: bool) -> None:
    async with local_client(keyless_app) as http:
        r = await http.get("/v1/models", headers={"Host": host})
        assert r.status_code == (200 if served else 401)


async def test_a_trusted_local_proxy_still_gets_no_keyless_access(tmp_path: Path) -> None:
    """With the proxy trusted, the client address is rewritten from X-Forwarded-For; the
    forwarding header still says the caller is not local."""
    settings = settings_for(
        tmp_path, auth_enabled=False, warmup=False, trusted_proxies=["127.0.0.1/32"]
    )
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120), local_client(app) as http:
        assert (await http.get("/v1/models")).status_code == 200
        relayed = await http.get("/v1/models", headers={"X-Forwarded-For": "127.0.0.1"})
        assert relayed.status_code == 401


async def test_the_keyless_caller_is_not_a_paid_user(keyless_app: Any) -> None:
    async with local_client(keyless_app) as http:
        keyless = sdk(http)
        raw = await keyless.completions.with_raw_response.create(
            model=MODEL, prompt="hi", max_tokens=1
        )
        # The anonymous tier's limits (per client address), not the paid tier's 600.
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        with pytest.raises(openai.APIStatusError) as refused:
            await keyless.completions.create(model=PAID_MODEL, prompt="hi", max_tokens=1)
        assert refused.value.status_code == 402
