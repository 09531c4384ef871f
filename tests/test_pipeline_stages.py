"""The completion pipeline's stages, driven directly (no HTTP): a pipeline built with
`build_pipeline` from an app's models, in front of stub upstreams."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from bench.stub_upstream import StubConfig
from llm_api.core.exceptions import APIError
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.services.cache.service import CachePolicy
from llm_api.services.cache.store import MemoryCacheStore
from llm_api.services.llm.pipeline import PipelineParts, build_pipeline
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.llm.streams import first_then_rest
from llm_api.services.llm.types import CompletionRecord, RequestContext
from tests.routing_support import deployment, routed, routed_app, stubs


def request(model: str, stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "stream": stream,
        }
    )


@pytest.mark.parametrize("stream", [True, False])
async def test_the_fallback_stage_answers_from_the_next_model(tmp_path: Path, stream: bool) -> None:
    """The primary's 503 comes before any frame: the fallback stage runs the next candidate,
    the outcome names it, and the one record (to the subscribers given) is the spare's."""
    async with stubs(StubConfig(fail_status=503), StubConfig(tokens=2)) as (broken, spare):
        models = [
            routed("primary", [deployment(broken)], fallbacks=["spare"]),
            routed("spare", [deployment(spare)]),
        ]
        async with routed_app(tmp_path, models) as r:
            state = r.app.state.llm_api
            records: list[CompletionRecord] = []
            pipeline = build_pipeline(
                PipelineParts(state.llm, state.settings, subscribers=(records.append,))
            )
            serving = CompletionServing(state.llm, pipeline)
            ctx = RequestContext(request_id=f"fallback-{stream}")
            frames, out = await pipeline.run(
                serving.plan(request("primary", stream), ctx, None, stream=stream)
            )
            assert out.model == "spare"  # known before the first frame goes out
            text = "".join([f.text async for f in frames])
    assert text == "tok tok "
    assert (out.completion_tokens, out.cache) == (2, "miss")
    assert [(rec.model, rec.status, rec.completion_tokens) for rec in records] == [
        ("spare", 200, 2)
    ]
    assert broken.stats.requests >= 1 and spare.stats.completed == 1


async def test_no_fallback_once_a_frame_went_out(tmp_path: Path) -> None:
    """A stream that fails after its first frame has reached the client cannot change model:
    the error surfaces from the frames, and the spare is never asked."""
    async with stubs(StubConfig(tokens=8, die_after=1), StubConfig(tokens=2)) as (dying, spare):
        models = [
            routed("primary", [deployment(dying)], fallbacks=["spare"]),
            routed("spare", [deployment(spare)]),
        ]
        async with routed_app(tmp_path, models) as r:
            serving: CompletionServing = r.app.state.llm_api.responses
            ctx = RequestContext(request_id="no-fallback")
            frames, out = await serving.pipeline.run(
                serving.plan(request("primary", True), ctx, None, stream=True)
            )
            assert out.model == "primary"
            with pytest.raises(APIError):
                async for _ in frames:
                    pass
    assert spare.stats.requests == 0
    assert [(rec.model, rec.status) for rec in r.records] == [("primary", 502)]


async def test_first_then_rest_raises_before_the_first_item_and_closes_the_source() -> None:
    closed: list[str] = []

    async def failing() -> AsyncGenerator[int, None]:
        try:
            raise APIError("down")
            yield 1
        finally:
            closed.append("failing")

    async def counting() -> AsyncGenerator[int, None]:
        try:
            for i in range(5):
                yield i
        finally:
            closed.append("counting")

    with pytest.raises(APIError):
        await first_then_rest(failing())
    started = await first_then_rest(counting())
    assert [await anext(started), await anext(started)] == [0, 1]
    await started.aclose()  # a client that went away: the source is closed at once
    assert closed == ["failing", "counting"]


@pytest.mark.parametrize("stream", [True, False])
async def test_the_cache_stage_runs_the_model_once_then_replays(
    tmp_path: Path, stream: bool
) -> None:
    """A miss runs the rest of the pipeline once (one upstream request) and stores the teed
    frames; the same request then replays them without reaching the model, still admitted and
    recorded (as a hit), with the same text and usage."""
    async with (
        stubs(StubConfig(tokens=3)) as (upstream,),
        routed_app(tmp_path, [routed("m", [deployment(upstream)])]) as r,
    ):
        state = r.app.state.llm_api
        records: list[CompletionRecord] = []
        pipeline = build_pipeline(
            PipelineParts(
                state.llm,
                state.settings,
                store=MemoryCacheStore(1 << 20, 60),
                subscribers=(records.append,),
            )
        )
        serving = CompletionServing(state.llm, pipeline)
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": stream,
        }
        answers = []
        for i in range(2):
            req = ChatCompletionRequest.model_validate(body)
            ctx = RequestContext(request_id=f"cache-{stream}-{i}")
            call = serving.plan(req, ctx, CachePolicy(), stream=stream)
            frames, out = await pipeline.run(call)
            got = [f async for f in frames]
            answers.append(("".join(f.text for f in got), out.cache, out.completion_tokens))
    assert answers == [("tok tok tok ", "miss", 3), ("tok tok tok ", "hit", 3)]
    assert upstream.stats.requests == 1
    assert [(rec.cache_hit, rec.completion_tokens) for rec in records] == [(False, 3), (True, 3)]
