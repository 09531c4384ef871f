"""What an upstream can make the gateway do: follow it elsewhere (never), read without end (never),
and when its timeouts run. Real stub upstreams on loopback, the official openai SDK."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.stub_upstream import StubConfig
from tests.conftest import eventually
from tests.routing_support import Routed, deployment, routed, routed_app, stubs

KEY_ENV = "LLM_API_TEST_LIMITS_KEY"
KEY = "sk-upstream-limits-5e1d"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def upstream_key() -> Iterator[None]:
    os.environ[KEY_ENV] = KEY
    yield
    os.environ.pop(KEY_ENV, None)


def direct(model_id: str, base_url: str, **extra: Any) -> dict[str, Any]:
    """A plain `openai` backend model (no router, no retries)."""
    return {
        "id": model_id,
        "backend": "openai",
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "concurrency": 8,
        **extra,
    }


async def _ask(r: Routed, model: str, stream: bool, legacy: bool = False) -> str:
    """The whole answer's text, streamed or not, chat or legacy completions."""
    if legacy:
        if stream:
            parts = await r.client.completions.create(
                model=model, prompt="hi", max_tokens=8, stream=True
            )
            return "".join([c.choices[0].text async for c in parts if c.choices])
        reply = await r.client.completions.create(model=model, prompt="hi", max_tokens=8)
        return reply.choices[0].text
    if stream:
        chunks = await r.client.chat.completions.create(
            model=model, messages=HI, max_tokens=8, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    answer = await r.client.chat.completions.create(model=model, messages=HI, max_tokens=8)
    return answer.choices[0].message.content or ""


# --- redirects -------------------------------------------------------------------------------


async def test_a_redirect_is_an_upstream_error_and_never_followed(tmp_path: Path) -> None:
    """A 3xx would re-send the prompt (and, same origin, our key) to its `Location`."""
    async with stubs(StubConfig(tokens=2)) as (target,):
        to = f"{target.base_url}/chat/completions"
        async with (
            stubs(StubConfig(redirect_to=to)) as (redirecting,),
            routed_app(tmp_path, [direct("d", redirecting.base_url)]) as r,
        ):
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as info:
                    await _ask(r, "d", stream)
                assert info.value.status_code == 502
                err = info.value.response.json()["error"]
                assert err["code"] == "upstream_error"
                assert "redirect (status 307)" in err["message"]
                assert str(target.port) not in info.value.response.text
    assert redirecting.stats.requests == 2
    assert target.stats.requests == 0  # nothing reached the Location


async def test_a_health_check_does_not_follow_a_redirect(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=1)) as (target,):
        to = f"{target.base_url}/models"
        async with stubs(StubConfig(redirect_to=to), StubConfig(tokens=1)) as (redirecting, good):
            policy = {"breaker_failures": 1, "breaker_cooldown": 60, "health_check_interval": 0.1}
            deps = [deployment(redirecting, api_key_env=KEY_ENV), deployment(good)]
            async with routed_app(tmp_path, [routed("m", deps, routing=policy)]) as r:
                router = r.app.state.llm_api.llm.backends["m"]

                async def redirecting_is_open() -> bool:
                    return "open" in await router.breakers.states(router._names)

                await eventually(redirecting_is_open)  # a redirect is no healthy answer
    assert redirecting.stats.models >= 1
    assert target.stats.models == 0


# --- bounded reads ---------------------------------------------------------------------------


async def test_an_endless_error_body_is_read_only_in_part(tmp_path: Path) -> None:
    """An error body is read for its message, at most 64 KiB of it: a 500 whose body never
    ends is a prompt 502, not a read that never returns (nor memory that grows with it)."""
    async with (
        stubs(StubConfig(fail_status=500, endless_error=True)) as (a,),
        routed_app(tmp_path, [direct("d", a.base_url)]) as r,
    ):
        for stream in (False, True):
            async with asyncio.timeout(30):  # first_token_timeout is the default 60 s
                with pytest.raises(openai.APIStatusError) as info:
                    await _ask(r, "d", stream)
            assert info.value.status_code == 502
            assert info.value.response.json()["error"]["code"] == "upstream_error"
    assert a.stats.requests == 2


async def test_an_oversized_event_is_refused(tmp_path: Path) -> None:
    """One SSE line of more than 1 MiB (MAX_LINE_BYTES) is an upstream error, not a chunk."""
    async with (
        stubs(StubConfig(tokens=1, token="x" * (1024 * 1024 + 10))) as (big,),
        stubs(StubConfig(tokens=1, token="y" * (1024 * 1024 - 1000))) as (fits,),
        routed_app(tmp_path, [direct("big", big.base_url), direct("fits", fits.base_url)]) as r,
    ):
        with pytest.raises(openai.APIStatusError) as info:
            await _ask(r, "big", stream=False)
        assert info.value.status_code == 502
        assert "oversized" in info.value.response.json()["error"]["message"]
        assert await _ask(r, "fits", stream=False) == "y" * (1024 * 1024 - 1000)


async def test_a_non_streamed_answer_is_read_whole_within_a_bound(tmp_path: Path) -> None:
    """An upstream that ignores `stream` and answers with one JSON completion: its answer is
    read (up to 4 MiB, MAX_BODY_BYTES) and passed on, streamed or not; a larger one is refused."""
    async with (
        stubs(StubConfig(tokens=3, stream=False)) as (whole,),
        stubs(StubConfig(tokens=1, token="z" * (4 * 1024 * 1024 + 1), stream=False)) as (big,),
        routed_app(tmp_path, [direct("d", whole.base_url), direct("big", big.base_url)]) as r,
    ):
        for stream in (False, True):
            for legacy in (False, True):
                assert await _ask(r, "d", stream, legacy) == "tok " * 3
        reply = await r.client.chat.completions.create(model="d", messages=HI, max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        with pytest.raises(openai.APIStatusError) as info:
            await _ask(r, "big", stream=False)
        assert info.value.status_code == 502
        assert "oversized" in info.value.response.json()["error"]["message"]


# --- first-token timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
async def test_first_token_timeout_runs_until_the_first_text(tmp_path: Path, legacy: bool) -> None:
    """An upstream that opens with a role-only chunk (or an empty text) and sends its first token
    a second later: the first-token timeout (5 s) applies to that second, not the idle timeout
    between tokens (0.3 s)."""
    timeouts = {"first_token_timeout": 5, "idle_timeout": 0.3}
    async with (
        stubs(StubConfig(tokens=3, first_token_delay=1.0)) as (slow_start,),
        routed_app(tmp_path, [direct("d", slow_start.base_url, **timeouts)]) as r,
    ):
        for stream in (False, True):
            assert await _ask(r, "d", stream, legacy) == "tok " * 3
    assert slow_start.stats.completed == 2


async def test_a_role_chunk_alone_is_held_to_the_first_token_timeout(tmp_path: Path) -> None:
    """The other side: a role chunk then silence is a first-token timeout (0.5 s), not a wait
    of the idle timeout (30 s)."""
    timeouts = {"first_token_timeout": 0.5, "idle_timeout": 30}
    async with (
        stubs(StubConfig(tokens=3, stall_after=0)) as (mute,),
        routed_app(tmp_path, [direct("d", mute.base_url, **timeouts)]) as r,
    ):
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            await _ask(r, "d", stream=True)
        elapsed = time.monotonic() - start
    assert info.value.status_code == 504  # nothing was sent: a plain HTTP error
    assert info.value.response.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < 10


async def test_a_role_chunk_does_not_commit_the_response(tmp_path: Path) -> None:
    """A replica that sends its role chunk and dies has sent no content: the request is retried
    on another replica, as a failure before the first chunk is."""
    async with stubs(StubConfig(tokens=3, die_after=0), StubConfig(tokens=2)) as (dies, other):
        deps = [deployment(dies, weight=1000), deployment(other, weight=0.001)]
        async with routed_app(tmp_path, [routed("m", deps, routing={"retries": 1})]) as r:
            assert await _ask(r, "m", stream=True) == "tok " * 2
            assert await _ask(r, "m", stream=False) == "tok " * 2
    assert dies.stats.requests == 2
    assert other.stats.completed == 2
