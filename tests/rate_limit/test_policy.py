"""Which limits apply (tiers, overrides, scopes), the settings that configure them, the header
formats, the start-up warning, and the trusted-proxy client IP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import Request
from pydantic import ValidationError

from llm_api.main import create_app
from llm_api.services.llm.types import RequestContext
from llm_api.services.rate_limit.headers import duration
from llm_api.services.rate_limit.limiter import build_rate_limiter
from llm_api.services.rate_limit.policy import LimitPolicy
from tests.conftest import test_settings as make_settings


def names(specs: list[Any]) -> list[str]:
    return [f"{s.scope}:{s.name}={s.limit}" for s in specs]


def test_tiers_merge_over_defaults(tmp_path: Path) -> None:
    s = make_settings(tmp_path, rate_limit_tiers={"free": {"requests_per_minute": 5}})
    assert s.rate_limit_tiers["free"].requests_per_minute == 5
    assert s.rate_limit_tiers["free"].tokens_per_minute == 40_000  # the default stays
    assert s.rate_limit_tiers["paid"].requests_per_minute == 600
    with pytest.raises(ValidationError):
        make_settings(tmp_path, rate_limit_tiers={"free": {"requests_per_minute": 0}})
    with pytest.raises(ValidationError):
        make_settings(tmp_path, rate_limit_login_per_client="lots")
    with pytest.raises(ValidationError):
        make_settings(tmp_path, rate_limit_redis_timeout_ms=5000)  # never above 1 s


def test_limits_per_user_key_and_ip(tmp_path: Path) -> None:
    overrides = tmp_path / "limits.yaml"
    overrides.write_text(
        "users:\n  u-big: {requests_per_minute: 1000}\nkeys:\n  k-small: {concurrent_requests: 1}\n"
    )
    policy = LimitPolicy.from_settings(make_settings(tmp_path, rate_limit_overrides_file=overrides))
    ctx = RequestContext("r", user_id="u1", key_id="k1", tier="free", client_ip="10.0.0.1")
    assert names(policy.for_completion(ctx, 100)) == [
        "user:rpm=60", "user:tpm=40000", "user:tpd=1000000", "user:concurrency=4",
        "ip:rpm=300", "ip:tpm=200000", "ip:concurrency=32",
    ]  # fmt: skip
    big = RequestContext("r", user_id="u-big", key_id="k-small", tier="free", client_ip=None)
    specs = policy.for_completion(big, 100)
    assert "user:rpm=1000" in names(specs)
    assert "key:concurrency=1" in names(specs)  # a key with its own override is checked too
    assert all(s.cost == 100 for s in specs if s.metric == "tokens")
    anonymous = RequestContext("r", tier="anonymous", client_ip="10.0.0.2")  # auth disabled
    assert names(policy.for_completion(anonymous, 1))[:2] == ["client:rpm=60", "client:tpm=40000"]
    unknown = RequestContext("r", user_id="u2", tier="gold")
    assert names(policy.for_completion(unknown, 1))[0] == "user:rpm=60"  # falls back to free


def test_reset_duration_format() -> None:
    assert [duration(ms) for ms in (12, 999, 1000, 1001, 60_000, 360_000, 3_723_000)] == [
        "12ms", "999ms", "1s", "2s", "1m0s", "6m0s", "1h2m3s",
    ]  # fmt: skip


def test_warns_when_workers_share_no_redis(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        build_rate_limiter(make_settings(tmp_path, workers=2, rate_limit_enabled=True), None)
    assert any(e["event"] == "rate_limit_memory_with_workers" for e in logs)
    with structlog.testing.capture_logs() as logs:
        build_rate_limiter(make_settings(tmp_path, workers=1, rate_limit_enabled=True), None)
    assert logs == []


@pytest.mark.parametrize(
    "trusted,peer,xff,expected",
    [
        ([], "127.0.0.1", "1.2.3.4", "127.0.0.1"),  # untrusted peer: header ignored
        (["10.0.0.0/8"], "10.0.0.5", "1.2.3.4", "1.2.3.4"),
        # right to left, skipping trusted hops; a spoofed left part is never reached
        (["10.0.0.0/8"], "10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.7", "1.2.3.4"),
        (["10.0.0.0/8"], "192.0.2.9", "1.2.3.4", "192.0.2.9"),
    ],
)
async def test_client_ip_through_trusted_proxies_only(
    tmp_path: Path, trusted: list[str], peer: str, xff: str, expected: str
) -> None:
    """The app's own middleware stack (create_app), read back through a route."""
    app = create_app(make_settings(tmp_path, trusted_proxies=trusted, web_ui=False))

    @app.get("/_test/ip2")
    async def ip2(request: Request) -> dict[str, str | None]:
        return {"ip": request.client.host if request.client else None}

    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/_test/ip2", headers={"X-Forwarded-For": xff})
    assert r.json() == {"ip": expected}
