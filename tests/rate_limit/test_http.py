"""The limiter through the app (real model, real openai SDK and httpx, in-process): headers on
200 and 429, TPM reservation settled to real usage, X-Forwarded-For from an untrusted peer,
key-creation limits, Redis outages, and the defaults a new user meets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llm_api.services.rate_limit.memory_store import MemoryStore
from tests.conftest import MODEL, Account, create_account, eventually
from tests.pipeline_support import listen
from tests.rate_limit.conftest import RedisServer, limits_on

CHAT = "/v1/chat/completions"


def chat_body(max_tokens: int = 1, stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 1.0,  # not deterministic: never answered from the response cache
        **kw,
    }


async def post(http: httpx.AsyncClient, acct: Account, **kw: Any) -> httpx.Response:
    headers = {**acct.headers, **kw.pop("headers", {})}
    return await http.post(CHAT, json=chat_body(**kw), headers=headers)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_headers_on_200_and_429(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, backend: str
) -> None:
    async with limits_on(app, tmp_path, backend, tiers={"free": {"requests_per_minute": 3}}):
        records = listen(app)
        acct = await create_account(app)
        remaining = []
        for stream in (False, True, False):
            r = await post(http, acct, stream=stream)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "3"
            assert r.headers["x-ratelimit-reset-requests"] == "10m0s"  # limits_on's "minute"
            assert int(r.headers["x-ratelimit-limit-tokens"]) == 40_000
            assert int(r.headers["x-ratelimit-remaining-tokens"]) < 40_000
            assert r.headers["x-ratelimit-reset-tokens"]
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["2", "1", "0"]
        generated = len(records)
        for stream in (False, True):
            r = await post(http, acct, stream=stream)
            assert r.status_code == 429
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert "requests per minute (RPM)" in err["message"]
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            retry_after = int(r.headers["retry-after"])
            assert 1 <= retry_after <= 600  # limits_on's "minute" is 10 min
            assert retry_after * 1000 >= int(r.headers["retry-after-ms"])
        # The refused requests never reached the model, so nothing records them (no usage row
        # per refusal for a client hammering the limit).
        assert records[generated:] == []


async def test_sdk_sees_rate_limit_error(app: Any, tmp_path: Path) -> None:
    async with limits_on(app, tmp_path, tiers={"free": {"requests_per_minute": 1}}):
        acct = await create_account(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as h:
            sdk = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key=acct.api_key, http_client=h, max_retries=0
            )
            msgs: Any = [{"role": "user", "content": "hi"}]
            ok = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=msgs, max_tokens=2
            )
            assert ok.headers["x-ratelimit-remaining-requests"] == "0"
            with pytest.raises(openai.RateLimitError) as info:
                await sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
            assert info.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_tpm_reservation_settles_to_real_usage(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, backend: str
) -> None:
    limit = 2000
    async with limits_on(app, tmp_path, backend, tiers={"free": {"tokens_per_minute": limit}}):
        acct = await create_account(app)
        first = await post(http, acct, max_tokens=300, temperature=0)
        assert first.status_code == 200
        usage = first.json()["usage"]
        # Reserved at admission, before tokenizing: the prompt estimated from its characters
        # as OpenAI does ("Say hi": 6 // 3 + 1 = 3 tokens), + max_tokens.
        estimate = 3
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == limit - estimate - 300
        assert usage["completion_tokens"] < 300  # "Say hi" stops early: settlement matters
        second = await post(http, acct, max_tokens=100, temperature=0)
        assert second.status_code == 200
        # The first is now settled to its real total; the second is reserved.
        expected = limit - usage["total_tokens"] - estimate - 100
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == expected
        # A request whose reservation does not fit is refused before the model.
        big = await post(http, acct, max_tokens=limit)
        assert big.status_code == 429
        assert "tokens per minute (TPM)" in big.json()["error"]["message"]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_requests_failing_in_preparation_count(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, backend: str
) -> None:
    """Admission comes before tokenizing: 70 prompts over the model's context window against
    60 requests a minute get 60 errors then 429s (failed requests count, as at OpenAI), and
    the remaining-requests header drops with each. Their reserved tokens come back: no model
    processed them."""
    tiers = {
        # Only counting under test: no lease a Redis settlement has yet to free can refuse.
        "free": {"requests_per_minute": 60, "concurrent_requests": None},
        "ip": {"tokens_per_minute": None, "concurrent_requests": None},
    }
    async with limits_on(app, tmp_path, backend, tiers=tiers):
        records = listen(app)
        acct = await create_account(app)
        long = [{"role": "user", "content": "hello " * 2100}]  # past the 2048-token window
        responses = [await post(http, acct, messages=long) for _ in range(70)]
        assert [r.status_code for r in responses] == [400] * 60 + [429] * 10
        assert responses[0].json()["error"]["code"] == "context_length_exceeded"
        left = [r.headers["x-ratelimit-remaining-requests"] for r in responses]
        assert left == [str(n) for n in range(59, -1, -1)] + ["0"] * 10
        assert "requests per minute (RPM)" in responses[-1].json()["error"]["message"]
        assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in records] == [
            (400, 0, 0)
        ] * 60
        if backend == "memory":  # settled at once (Redis settles in a task of its own)
            # Each reserved its estimate alone: 12600 characters / 3, capped by the 2048-token
            # window no prompt can exceed, plus max_tokens 1.
            tokens = {r.headers["x-ratelimit-remaining-tokens"] for r in responses[:60]}
            assert tokens == {str(40_000 - 2049)}


async def test_forwarded_for_from_untrusted_peer_changes_nothing(
    app: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The per-IP aggregate holds over many accounts and rotating X-Forwarded-For headers
    (the test client's peer, 127.0.0.1, is not a trusted proxy)."""
    tiers = {"free": {"requests_per_minute": 100}, "ip": {"requests_per_minute": 3}}
    async with limits_on(app, tmp_path, tiers=tiers):
        statuses = []
        for i in range(6):
            acct = await create_account(app)  # "single IP, many keys"
            r = await post(http, acct, headers={"X-Forwarded-For": f"203.0.113.{i}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert "on this client IP" in r.json()["error"]["message"]
        assert statuses == [200, 200, 200, 429, 429, 429]


async def test_key_creation_is_limited(app: Any, http: httpx.AsyncClient, tmp_path: Path) -> None:
    async with limits_on(app, tmp_path, rate_limit_key_creation="2/hour"):
        acct = await create_account(app)
        codes = [
            (await http.post("/v1/keys", json={"name": "k"}, headers=acct.headers)).status_code
            for _ in range(3)
        ]
        assert codes == [201, 201, 429]


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_redis_outage_follows_the_failure_mode(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, private_redis: RedisServer, mode: str
) -> None:
    tiers = {"free": {"requests_per_minute": 4}, "ip": {"requests_per_minute": None}}
    async with limits_on(
        app,
        tmp_path,
        "redis",
        tiers=tiers,
        redis_url=private_redis.url,
        rate_limit_failure_mode=mode,
        rate_limit_replicas=2,  # local share: 4 ÷ 2 = 2 per process
    ) as limiter:
        acct = await create_account(app)
        assert (await post(http, acct)).status_code == 200
        private_redis.stop()
        codes = [(await post(http, acct)).status_code for _ in range(4)]
        assert 500 not in codes
        if mode == "local":
            assert codes == [200, 200, 429, 429]  # its share, never unlimited
        elif mode == "open":
            assert codes == [200, 200, 200, 200]
        else:
            assert codes == [503] * 4
            r = await post(http, acct)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        private_redis.start()  # without persistence: it comes back empty
        await limiter_recovers(limiter)
        codes = [(await post(http, acct)).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429]  # the full limit again, shared via Redis


async def limiter_recovers(limiter: Any) -> None:
    for _ in range(50):
        if not limiter.store.down and await limiter.store.ping():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the limiter did not reconnect")


async def test_defaults_as_a_new_user_meets_them(
    app: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """With the shipped defaults a new free user can chat like a person in the playground
    (a burst of 10 messages, streaming or not), and sees the limits in the headers."""
    async with limits_on(app, tmp_path, "redis"):
        acct = await create_account(app)
        for i in range(10):
            r = await post(http, acct, stream=i % 2 == 1)
            assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert r.headers["x-ratelimit-remaining-requests"] == "50"
        assert r.headers["x-ratelimit-limit-tokens"] == "40000"
        paid = await create_account(app, tier="paid")
        r = await post(http, paid)
        # The headers report the limit with the least room: here the per-IP cap (300, with 11
        # requests from this address) binds before the paid user's own 600.
        assert r.headers["x-ratelimit-limit-requests"] == "300"
        assert r.headers["x-ratelimit-remaining-requests"] == "289"


async def leases_held(limiter: Any, user_id: str) -> int:
    """Live concurrency leases of a user, read from the store itself."""
    key = f"user:{user_id}:concurrency"
    store = limiter.store
    if isinstance(store, MemoryStore):
        table = store._leases.get(key)
        return 0 if table is None else sum(1 for _ in table.expiry)
    redis = store.redis
    t = await redis.time()
    return int(await redis.zcount(f"{{{store.prefix}}}:{key}:z", t[0] * 1000, "+inf"))


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_concurrency_cap_and_counter_back_to_zero(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, backend: str
) -> None:
    async with limits_on(
        app, tmp_path, backend, tiers={"free": {"concurrent_requests": 2}}
    ) as limiter:
        acct = await create_account(app)
        # Raw-text counting never reaches end-of-sequence: these run until cancelled.
        counting = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1500}
        long = [
            asyncio.create_task(http.post("/v1/completions", json=counting, headers=acct.headers))
            for _ in range(2)
        ]

        async def both_in_flight() -> bool:
            return await leases_held(limiter, acct.user_id) == 2

        await eventually(both_in_flight)
        r = await post(http, acct)
        assert r.status_code == 429
        assert "concurrent requests" in r.json()["error"]["message"]
        for task in long:  # the clients go away mid-generation
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)

        async def none_in_flight() -> bool:
            return limiter.in_flight == 0 and await leases_held(limiter, acct.user_id) == 0

        await eventually(none_in_flight)
        # Once settled, the slots are usable again (errors after admission: test_live.py).
        assert (await post(http, acct)).status_code == 200
        await eventually(none_in_flight)


async def test_cache_hits_count_against_the_limits(
    app: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A cached answer is still a request: it takes from RPM (and shows it in the headers), and
    once the limit is spent a request that would hit the cache gets 429 like any other."""
    async with limits_on(app, tmp_path, tiers={"free": {"requests_per_minute": 2}}):
        records = listen(app)
        acct = await create_account(app)
        messages = [{"role": "user", "content": f"Say hi. ({tmp_path.name})"}]
        # Enough room to finish with "stop": one short, repeatable answer.
        kw: dict[str, Any] = {"messages": messages, "temperature": 0, "max_tokens": 200}
        first = await post(http, acct, **kw)
        second = await post(http, acct, **kw)
        assert first.json()["choices"][0]["finish_reason"] == "stop"
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.json()["choices"] == first.json()["choices"]
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert [r.cache_hit for r in records] == [False, True]
        third = await post(http, acct, stream=True, **kw)
        assert third.status_code == 429, third.text
        assert len(records) == 2  # the refused hit is not recorded either
