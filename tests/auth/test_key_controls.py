"""Per-key controls (issue 26, point 1): model allow-lists (ids, aliases, wildcards) for every
API family, expiry (401 key_expired, never echoing the key, cache included), the key's own
rate limits (never above the tier, enforced as the lower of the two), client-IP allow-lists,
and PATCH applying at once. On SQLite and PostgreSQL, with the real model and the openai SDK."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llm_api.core.rate_limits import TierLimits
from llm_api.services.auth.key_controls import KeyControls, tightest
from llm_api.services.llm.types import RequestContext
from llm_api.services.rate_limit.policy import LimitPolicy, RateLimitOverrides
from tests.auth.conftest import FREE_ALIAS, PAID_MODEL, AuthEnv
from tests.conftest import MODEL, eventually
from tests.rate_limit.conftest import limits_on


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_key(env: AuthEnv, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = await env.http.post("/v1/keys", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def sdk(env: AuthEnv, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=env.http, max_retries=0
    )


async def model_ids(env: AuthEnv, key: str) -> list[str]:
    return [m.id async for m in sdk(env, key).models.list()]


async def test_allow_list_by_wildcard_names_only_the_refused_model(env: AuthEnv) -> None:
    made = await new_key(env, env.paid.headers, models=["smollm2-p*"])
    assert made["models"] == ["smollm2-p*"]
    client = sdk(env, made["key"])
    assert await model_ids(env, made["key"]) == [PAID_MODEL]
    ok = await client.chat.completions.create(
        model=PAID_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert ok.choices[0].message is not None
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_allowed", error
    text = json.dumps(error)
    assert MODEL in text and PAID_MODEL not in text and "smollm2-p*" not in text
    # Neither a model that does not exist nor its card: 403 too, so no probing of the registry.
    with pytest.raises(openai.PermissionDeniedError):
        await client.models.retrieve("no-such-model")
    assert (await client.models.retrieve(PAID_MODEL)).id == PAID_MODEL


async def test_allow_list_by_alias_covers_the_model_by_any_name(env: AuthEnv) -> None:
    made = await new_key(env, env.paid.headers, models=[FREE_ALIAS])
    assert await model_ids(env, made["key"]) == [MODEL]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk(env, made["key"]).completions.create(model=PAID_MODEL, prompt="a", max_tokens=1)
    assert PAID_MODEL in str(refused.value.body) and FREE_ALIAS not in str(refused.value.body)


FAMILIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": {"input": "hi"},
    "/v1/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"input": "hi", "max_output_tokens": 16},
}


async def test_every_api_family_and_batches_honour_the_allow_list(env: AuthEnv) -> None:
    key = (await new_key(env, env.paid.headers, models=[MODEL], scopes=["inference"]))["key"]
    for path, body in FAMILIES.items():
        r = await env.http.post(path, json={**body, "model": PAID_MODEL}, headers=bearer(key))
        assert r.status_code == 403, (path, r.text)
        assert PAID_MODEL in r.text and MODEL not in r.text, (path, r.text)
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": PAID_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    }
    client = sdk(env, key)
    uploaded = await client.files.create(
        file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch"
    )
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert PAID_MODEL in str(refused.value.body)


async def test_expired_key_is_401_key_expired_even_from_the_cache(env: AuthEnv) -> None:
    expires = time.time() + 1.5
    made = await new_key(env, env.user.headers, expires_at=expires)
    assert made["expires_at"] == int(expires)
    key = made["key"]
    assert (await env.http.get("/v1/models", headers=bearer(key))).status_code == 200
    authenticator = env.app.state.llm_api.auth.authenticator
    assert authenticator.cached(key) is not None  # verified, and served from the cache now

    async def refused() -> bool:
        r = await env.http.get("/v1/models", headers=bearer(key))
        return r.status_code == 401

    await eventually(refused, timeout=10)
    r = await env.http.get("/v1/models", headers=bearer(key))
    assert r.json()["error"]["code"] == "key_expired"
    assert key not in r.text and key[:16] not in r.text
    # The database path says the same (not only the cache).
    authenticator.keys.clear()
    again = await env.http.get("/v1/models", headers=bearer(key))
    assert again.status_code == 401 and again.json()["error"]["code"] == "key_expired"
    assert key not in again.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"expires_at": 1_000_000}, "expires_at"),  # in the past
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"allowed_ips": ["10.0.0.0/33"]}, "allowed_ips"),
        ({"models": [""]}, "models"),
        ({"limits": {"requests_per_minute": 61}}, "limits.requests_per_minute"),  # free: 60
        ({"limits": {"tokens_per_day": 2_000_000}}, "limits.tokens_per_day"),  # free: 1M
    ],
)
async def test_invalid_controls_are_400_naming_the_field(
    env: AuthEnv, body: dict[str, Any], param: str
) -> None:
    r = await env.http.post("/v1/keys", json=body, headers=env.user.headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param in (error.get("param") or "") or param in error["message"], error


async def test_iso_expiry_and_limits_within_the_tier_are_stored(env: AuthEnv) -> None:
    made = await new_key(
        env,
        env.user.headers,
        name="ci",
        expires_at="2099-01-01T00:00:00Z",
        limits={"requests_per_minute": 60, "concurrent_requests": 1},
        allowed_ips=["10.1.2.3/8", "::1"],
    )
    assert made["expires_at"] == 4070908800
    assert made["limits"] == {"requests_per_minute": 60, "concurrent_requests": 1}
    assert made["allowed_ips"] == ["10.0.0.0/8", "::1/128"]


async def test_client_ip_allow_list(env: AuthEnv) -> None:
    """Checked against the client address as the app sees it (after the trusted-proxy rewrite,
    which ProxyHeadersMiddleware applies before any route)."""
    key = (await new_key(env, env.user.headers, allowed_ips=["10.0.0.0/8"]))["key"]
    inside = httpx.ASGITransport(app=env.app, client=("10.9.8.7", 4000))
    outside = httpx.ASGITransport(app=env.app, client=("192.0.2.1", 4000))
    for transport, status in ((inside, 200), (outside, 403)):
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            r = await c.get("/v1/models", headers=bearer(key))
        assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "ip_not_allowed" and key not in r.text
    nowhere = (await new_key(env, env.user.headers, allowed_ips=[]))["key"]  # empty: deny all
    assert (await env.http.get("/v1/models", headers=bearer(nowhere))).status_code == 403


async def test_patch_applies_at_once(env: AuthEnv) -> None:
    made = await new_key(env, env.user.headers)
    key, key_id = made["key"], made["id"]
    assert MODEL in await model_ids(env, key)  # verified and cached
    narrow = {"models": ["other-*"], "name": "narrow"}
    r = await env.http.patch(f"/v1/keys/{key_id}", json=narrow, headers=env.user.headers)
    assert r.status_code == 200 and r.json()["models"] == ["other-*"], r.text
    assert await model_ids(env, key) == []
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(env, key).completions.create(model=MODEL, prompt="a", max_tokens=1)
    # null clears; limits above the tier are refused here too; others' keys are 404
    assert (
        await env.http.patch(f"/v1/keys/{key_id}", json={"models": None}, headers=env.user.headers)
    ).json()["models"] is None
    assert MODEL in await model_ids(env, key)
    too_high = {"limits": {"concurrent_requests": 999}}
    r = await env.http.patch(f"/v1/keys/{key_id}", json=too_high, headers=env.user.headers)
    assert r.status_code == 400 and "concurrent_requests" in r.text
    r = await env.http.patch(f"/v1/keys/{key_id}", json={"name": "x"}, headers=env.other.headers)
    assert r.status_code == 404
    expired = {"expires_at": time.time() + 0.5}
    assert (
        await env.http.patch(f"/v1/keys/{key_id}", json=expired, headers=env.user.headers)
    ).status_code == 200

    async def refused() -> bool:
        return (await env.http.get("/v1/models", headers=bearer(key))).status_code == 401

    await eventually(refused, timeout=10)


async def test_key_limits_are_enforced_with_429(env: AuthEnv, tmp_path: Path) -> None:
    if env.kind != "sqlite":
        pytest.skip("the limiter does not depend on the database")
    async with limits_on(env.app, tmp_path):
        key = (await new_key(env, env.user.headers, limits={"requests_per_minute": 2}))["key"]
        client = sdk(env, key)
        for _ in range(2):
            await client.completions.create(model=MODEL, prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert "requests per minute" in str(limited.value.body)
        # The user's other key is not held back by this key's own limit.
        other = sdk(env, env.user.api_key)
        await other.completions.create(model=MODEL, prompt="a", max_tokens=1)


def test_key_limits_bind_at_the_lower_of_key_and_tier() -> None:
    """A tier lowered after the key was made binds: min(key, tier) per limit."""
    policy = LimitPolicy(
        {"free": TierLimits(requests_per_minute=5, tokens_per_minute=100), "ip": TierLimits()},
        RateLimitOverrides(),
        60_000,
        "10/minute",
    )
    own = TierLimits(requests_per_minute=10, tokens_per_minute=50, concurrent_requests=2)
    ctx = RequestContext("r", user_id="u", key_id="k", controls=KeyControls(limits=own))
    key_specs = {s.name: s.limit for s in policy.for_completion(ctx, 1) if s.scope == "key"}
    assert key_specs == {"rpm": 5, "tpm": 50, "concurrency": 2}
    assert tightest(TierLimits(), own) == own
    without = RequestContext("r", user_id="u", key_id="k")
    assert not [s for s in policy.for_completion(without, 1) if s.scope == "key"]


async def test_cli_creates_keys_with_models_and_expiry(env: AuthEnv, tmp_path: Path) -> None:
    if env.kind != "sqlite":
        pytest.skip("one database is enough for the CLI's options")
    settings = env.app.state.llm_api.settings
    cli_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": settings.jwt_secret,
        "LLM_API_DATA_DIR": str(settings.data_dir),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "llm_api.cli", "keys", "create", env.paid.email, *args]
        return subprocess.run(command, env=cli_env, capture_output=True, text=True, check=False)

    made = cli("--models", f"{FREE_ALIAS},smollm2-x*", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    assert f"for models {FREE_ALIAS},smollm2-x*" in made.stdout and "expiring 20" in made.stdout
    key = made.stdout.strip().splitlines()[-1]
    assert await model_ids(env, key) == [MODEL]
    listed = (await env.http.get("/v1/keys", headers=env.paid.headers)).json()["data"]
    mine = next(k for k in listed if k["prefix"] == key[:16])
    assert 29 * 86400 < mine["expires_at"] - time.time() <= 30 * 86400
    bad = cli("--expires", "yesterday")
    assert bad.returncode == 1 and "expires_at" in bad.stderr
