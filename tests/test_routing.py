"""Routing one model id over several upstream replicas: strategies, aliases, retries before the
first byte (capped, backoff, Retry-After), fallbacks to other models, circuit breakers.

Every upstream is a real HTTP server on loopback (bench/stub_upstream.py); the client is the
official openai SDK."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

from bench.stub_upstream import StubConfig
from llm_api.services.llm.registry import Registry
from tests.conftest import create_account, eventually, free_port, require_service
from tests.routing_support import (
    chat,
    client_for,
    closed_port,
    deployment,
    routed,
    routed_app,
    stream_text,
    stubs,
)


async def test_weighted_random_follows_weights(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2), StubConfig(tokens=2)) as (a, b):
        model = routed("m", [deployment(a, weight=3), deployment(b, weight=1)])
        async with routed_app(tmp_path, [model]) as r:
            for _ in range(80):
                await chat(r, "m")
    assert a.stats.requests + b.stats.requests == 80
    assert 45 <= a.stats.requests <= 73  # expected 60; bounds are > 4 standard deviations


async def test_least_inflight_spreads_concurrent_streams(tmp_path: Path) -> None:
    slow = StubConfig(tokens=10, interval=0.05)
    async with stubs(slow, StubConfig(tokens=10, interval=0.05)) as (a, b):
        model = routed("m", [deployment(a), deployment(b)], routing={"strategy": "least_inflight"})
        async with routed_app(tmp_path, [model]) as r:
            await asyncio.gather(*(stream_text(r, "m") for _ in range(4)))
    assert (a.stats.requests, b.stats.requests) == (2, 2)


async def test_lowest_latency_prefers_the_faster_replica(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2, delay=0.2), StubConfig(tokens=2)) as (slow, fast):
        model = routed(
            "m", [deployment(slow), deployment(fast)], routing={"strategy": "lowest_latency"}
        )
        async with routed_app(tmp_path, [model]) as r:
            for _ in range(10):
                await chat(r, "m")
    assert slow.stats.requests == 1  # measured once, then avoided
    assert fast.stats.requests == 9


async def test_alias_resolves_to_the_model(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2)) as (a,):
        model = routed("real-model", [deployment(a)], aliases=["gpt-4o-mini", "fast"])
        async with routed_app(tmp_path, [model]) as r:
            resp = await chat(r, "fast")
            models = [m.id async for m in r.client.models.list()]
    assert resp.model == "real-model"
    assert a.stats.bodies[0]["model"] == "real-model"
    assert "fast" not in models and "real-model" in models


async def test_failover_to_a_live_replica(tmp_path: Path) -> None:
    """One replica refuses connections, one answers 500: every request still succeeds on the
    third, before any byte reached the client."""
    async with stubs(StubConfig(fail_status=500), StubConfig(tokens=3)) as (bad, good):
        model = routed(
            "m",
            [deployment(f"http://127.0.0.1:{closed_port()}/v1"), deployment(bad), deployment(good)],
            routing={"retries": 2, "backoff_base": 0.001},
        )
        async with routed_app(tmp_path, [model]) as r:
            for _ in range(6):
                assert (await chat(r, "m")).choices[0].message.content == "tok tok tok "
                text, _ = await stream_text(r, "m")
                assert text == "tok tok tok "
    assert good.stats.completed == 12
    assert [rec.status for rec in r.records] == [200] * 12  # one record per request


async def test_retries_are_capped_with_backoff(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=500)) as (bad,):
        model = routed("m", [deployment(bad)], routing={"retries": 3, "backoff_base": 0.1})
        async with routed_app(tmp_path, [model]) as r:
            t0 = time.perf_counter()
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(r, "m")
            elapsed = time.perf_counter() - t0
    assert exc.value.status_code == 502
    assert bad.stats.requests == 4  # one try + 3 retries, no more
    # backoff with equal jitter: 0.05-0.1 + 0.1-0.2 + 0.2-0.4 seconds
    assert 0.35 <= elapsed < 2.0
    assert r.records[-1].status == 502


async def test_retry_honours_retry_after(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2, fail_status=429, retry_after="1", fail_times=1)) as (a,):
        model = routed("m", [deployment(a)], routing={"retries": 2, "backoff_base": 0.001})
        async with routed_app(tmp_path, [model]) as r:
            t0 = time.perf_counter()
            resp = await chat(r, "m")
            elapsed = time.perf_counter() - t0
    assert resp.choices[0].message.content == "tok tok "
    assert a.stats.requests == 2
    assert elapsed >= 0.95  # waited for the upstream's Retry-After, not just the backoff


async def test_long_retry_after_is_not_waited_for(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=429, retry_after="30")) as (a,):
        model = routed("m", [deployment(a)], routing={"retries": 3, "max_retry_after": 5})
        async with routed_app(tmp_path, [model]) as r:
            t0 = time.perf_counter()
            with pytest.raises(openai.RateLimitError) as exc:
                await chat(r, "m")
    assert time.perf_counter() - t0 < 1.0
    assert a.stats.requests == 1
    assert exc.value.response.headers["retry-after"] == "30"


async def test_rate_limited_model_falls_back(tmp_path: Path) -> None:
    """429 from every replica of the primary → the next model in `fallbacks`, streaming too,
    with one usage record per request naming the model that answered."""
    async with stubs(StubConfig(fail_status=429, retry_after="30"), StubConfig(tokens=2)) as (
        limited,
        spare,
    ):
        models = [
            routed("primary", [deployment(limited)], fallbacks=["spare"]),
            routed("spare", [deployment(spare)]),
        ]
        async with routed_app(tmp_path, models) as r:
            resp = await chat(r, "primary")
            text, chunks = await stream_text(r, "primary")
    assert resp.model == "spare" and resp.choices[0].message.content == "tok tok "
    assert text == "tok tok " and chunks[0].model == "spare"
    # the second request skipped the primary's replica: its Retry-After had not passed
    assert limited.stats.requests == 1 and spare.stats.completed == 2
    assert [(rec.model, rec.status) for rec in r.records] == [("spare", 200)] * 2


async def test_context_too_long_falls_back(tmp_path: Path) -> None:
    async with stubs(StubConfig(context_limit=10), StubConfig(tokens=2)) as (small, large):
        models = [
            routed("small", [deployment(small)], fallbacks=["large"]),
            routed("large", [deployment(large)]),
        ]
        async with routed_app(tmp_path, models) as r:
            text, _ = await stream_text(r, "small")
    assert text == "tok tok "
    assert small.stats.failed == 1 and large.stats.completed == 1


async def test_bad_request_does_not_fall_back(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=400), StubConfig(tokens=2)) as (a, b):
        models = [
            routed("a", [deployment(a)], fallbacks=["b"], routing={"retries": 3}),
            routed("b", [deployment(b)]),
        ]
        async with routed_app(tmp_path, models) as r:
            with pytest.raises(openai.BadRequestError):
                await chat(r, "a")
    assert (a.stats.requests, b.stats.requests) == (1, 0)


async def test_fallbacks_pass_the_callers_tier_check(tmp_path: Path) -> None:
    """A free model whose fallbacks list a paid one: a free user who makes the free model fail
    (here a prompt over its context window, which anyone can send) never gets the paid model's
    answer; the paid fallback is skipped and the next one the user may use answers. A paid user
    gets the paid fallback."""
    async with stubs(
        StubConfig(context_limit=10),
        StubConfig(tokens=2, token="paid "),
        StubConfig(tokens=2, token="free "),
    ) as (small, premium, spare):
        models = [
            routed("small", [deployment(small)], fallbacks=["premium", "spare"]),
            routed("only-paid", [deployment(small)], fallbacks=["premium"]),
            routed("premium", [deployment(premium)], tier="paid"),
            routed("spare", [deployment(spare)]),
        ]
        async with routed_app(tmp_path, models, auth_enabled=True) as r:
            free = await create_account(r.app)
            paid = await create_account(r.app, tier="paid")
            async with client_for(r.app, free.api_key) as sdk:
                r.client = sdk
                resp = await chat(r, "small")
                assert (resp.model, resp.choices[0].message.content) == ("spare", "free free ")
                text, chunks = await stream_text(r, "small")
                assert (chunks[0].model, text) == ("spare", "free free ")
                with pytest.raises(openai.BadRequestError) as exc:  # the model's own error
                    await chat(r, "only-paid")
                assert exc.value.code == "context_length_exceeded"
                assert premium.stats.requests == 0
            async with client_for(r.app, paid.api_key) as sdk:
                r.client = sdk
                resp = await chat(r, "only-paid")
                assert (resp.model, resp.choices[0].message.content) == ("premium", "paid paid ")
    assert premium.stats.requests == 1
    assert [(rec.user_id, rec.model, rec.status) for rec in r.records] == [
        (free.user_id, "spare", 200),
        (free.user_id, "spare", 200),
        (free.user_id, "only-paid", 400),
        (paid.user_id, "premium", 200),
    ]


async def test_breaker_opens_half_opens_and_closes(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2, fail_status=500)) as (a,):
        policy = {"retries": 0, "breaker_failures": 2, "breaker_cooldown": 0.5}
        async with routed_app(tmp_path, [routed("m", [deployment(a)], routing=policy)]) as r:
            for _ in range(2):
                with pytest.raises(openai.InternalServerError) as exc:
                    await chat(r, "m")
                assert exc.value.status_code == 502
            # open: refused at once, the upstream is not called
            t0 = time.perf_counter()
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(r, "m")
            assert exc.value.status_code == 503 and time.perf_counter() - t0 < 0.2
            assert exc.value.response.headers["retry-after"]
            assert a.stats.requests == 2
            # half-open after the cooldown, probe fails → open again at once
            await asyncio.sleep(0.55)
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(r, "m")
            assert exc.value.status_code == 502 and a.stats.requests == 3
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(r, "m")
            assert exc.value.status_code == 503 and a.stats.requests == 3
            # the replica recovers; during half-open only one probe passes
            a.config.fail_status, a.config.interval, a.config.tokens = None, 0.1, 3
            await asyncio.sleep(0.55)
            probe = asyncio.create_task(chat(r, "m"))
            await eventually(lambda: a.stats.requests == 4)  # the probe reached the replica
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(r, "m")
            assert exc.value.status_code == 503
            assert (await probe).choices[0].message.content == "tok tok tok "
            # closed again: requests flow
            for _ in range(3):
                await chat(r, "m")
    assert a.stats.completed == 4


async def test_breaker_skips_a_dead_replica(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=503), StubConfig(tokens=1)) as (bad, good):
        policy = {"retries": 1, "breaker_failures": 2, "breaker_cooldown": 60}
        model = routed("m", [deployment(bad), deployment(good)], routing=policy)
        async with routed_app(tmp_path, [model]) as r:
            for _ in range(20):
                await chat(r, "m")
    assert bad.stats.requests == 2  # then its breaker stayed open
    assert good.stats.completed == 20


async def test_active_health_check_opens_the_breaker(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=503), StubConfig(tokens=1)) as (bad, good):
        policy = {"breaker_failures": 1, "breaker_cooldown": 60, "health_check_interval": 0.1}
        model = routed("m", [deployment(bad), deployment(good)], routing=policy)
        async with routed_app(tmp_path, [model]) as r:
            router = r.app.state.llm_api.llm.backends["m"]

            async def bad_is_open() -> bool:
                return "open" in await router.breakers.states(router._names)

            await eventually(bad_is_open)  # a health check ran (every 0.1 s) and found it down
            for _ in range(10):
                await chat(r, "m")
    assert bad.stats.requests == 0  # the health check found it down before any request
    assert good.stats.completed == 10


async def test_breaker_state_is_shared_through_redis(tmp_path: Path) -> None:
    """Two app instances (two workers) share breakers: failures seen by one open the breaker
    for the other, which then never calls the dead replica."""
    require_service("Redis", "127.0.0.1", 6379)
    model_id = f"m-{uuid.uuid4().hex[:8]}"  # fresh keys in the shared Redis
    async with stubs(StubConfig(tokens=1, fail_status=500)) as (a,):
        # Margins for a loaded CI machine: a breaker call slower than the timeout (100 ms by
        # default) falls back to local state, and the shared open state must outlive the
        # requests between the two workers.
        policy = {"retries": 0, "breaker_failures": 2, "breaker_cooldown": 2.0}
        models = [routed(model_id, [deployment(a, name="a")], routing=policy)]
        shared = {"redis_url": "redis://127.0.0.1:6379/0", "breaker_redis_timeout_ms": 5000}
        async with (
            routed_app(tmp_path / "w1", models, **shared) as w1,
            routed_app(tmp_path / "w2", models, **shared) as w2,
        ):
            for _ in range(2):
                with pytest.raises(openai.InternalServerError):
                    await chat(w1, model_id)
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(w2, model_id)
            assert exc.value.status_code == 503 and a.stats.requests == 2
            a.config.fail_status = None
            await asyncio.sleep(2.05)
            await chat(w2, model_id)  # the half-open probe, from the other worker
            await chat(w1, model_id)  # closed for everyone
            ttl = await w1.app.state.llm_api.llm.backends[model_id].breakers.redis.pttl(
                f"llm-api:cb:{model_id}:a:f"
            )
    assert a.stats.completed == 2
    assert ttl == -2  # cleared on success; every key it writes carries a TTL


async def test_breaker_works_locally_while_redis_is_down(tmp_path: Path) -> None:
    """Redis unreachable (nothing listens on its port): each breaker call fails fast and the
    process keeps its own breaker state, so the dead replica is still cut off."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with stubs(StubConfig(tokens=1, fail_status=500)) as (a,):
        policy = {"retries": 0, "breaker_failures": 2, "breaker_cooldown": 60}
        models = [routed("m", [deployment(a, name="a")], routing=policy)]
        async with routed_app(tmp_path, models, redis_url=dead_redis) as w:
            for _ in range(2):
                with pytest.raises(openai.InternalServerError) as exc:
                    await chat(w, "m")
                assert exc.value.status_code == 502
            with pytest.raises(openai.InternalServerError) as exc:
                await chat(w, "m")
    assert exc.value.status_code == 503
    assert a.stats.requests == 2


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"id": "a", "backend": "router"}], "deployments"),
        (
            [
                {
                    "id": "a",
                    "backend": "openai",
                    "base_url": "http://x",
                    "deployments": [{"base_url": "http://y"}],
                }
            ],
            "deployments",
        ),
        ([routed("a", [{"base_url": "http://x", "model": "b"}])], "exactly one"),
        ([routed("a", [{"base_url": "file:///etc/passwd"}])], "http"),
        (
            [
                routed("a", [deployment("http://x")], aliases=["b"]),
                routed("b", [deployment("http://y")]),
            ],
            "unique",
        ),
        ([routed("a", [deployment("http://x")], fallbacks=["nope"])], "unknown fallback"),
        ([routed("a", [{"model": "not-local"}])], "not a local model"),
    ],
)
def test_registry_rejects_bad_routing(models: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Registry.model_validate({"models": models})
