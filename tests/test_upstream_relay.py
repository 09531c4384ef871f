"""The upstream relay is lossless: what a client sends reaches the upstream as sent (only the
model name, stream settings and per-choice fields replaced), and what the upstream streams back
(tool-call pieces, reasoning, logprobs, refusals, annotations, usage details) reaches the Frames
exactly, on the text fast path's side road, through retries and fallbacks, however the bytes are
cut into reads.

Driven against the stub upstream over loopback, through `OpenAIUpstreamBackend` and
`RoutedBackend` themselves (the HTTP encoders above them are tested where they live).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from bench.stub_upstream import StubConfig, StubUpstream
from llm_api.core.exceptions import UpstreamError
from llm_api.services.llm.backends.openai_upstream import OpenAIUpstreamBackend
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.routing.breaker import MemoryBreakers
from llm_api.services.llm.routing.config import DeploymentConfig, RoutingPolicy
from llm_api.services.llm.routing.deployments import Deployment
from llm_api.services.llm.routing.router import RoutedBackend
from llm_api.services.llm.types import (
    Frame,
    GenerationRequest,
    Message,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    TopLogprob,
)
from tests.routing_support import stubs

pytestmark = pytest.mark.asyncio


def _config(stub: StubUpstream, **extra: Any) -> ModelConfig:
    return ModelConfig(
        id="m", backend="openai", base_url=stub.base_url, upstream_model="up-model", **extra
    )


@asynccontextmanager
async def _backend(stub: StubUpstream, **extra: Any) -> AsyncIterator[OpenAIUpstreamBackend]:
    backend = OpenAIUpstreamBackend(_config(stub, **extra))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


def _request(wire: dict[str, Any] | None = None, **kw: Any) -> GenerationRequest:
    params = kw.pop("params", None) or SamplingParams(max_tokens=64, temperature=0.7, top_p=0.95)
    kw.setdefault("messages", [Message("user", "hi")])
    return GenerationRequest(request_id="r", model="m", params=params, wire=wire, **kw)


async def _frames(backend: Any, request: GenerationRequest) -> list[Frame]:
    return [f async for f in backend.generate(request)]


def _sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def _chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **choice: Any
) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "up-model",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, **choice}],
    }


def _usage(**extra: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, **extra}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def _calls(frames: list[Frame]) -> dict[int, dict[str, Any]]:
    """Tool calls put together as a client does: by index, id and name from the first piece,
    arguments concatenated."""
    calls: dict[int, dict[str, Any]] = {}
    for f in frames:
        for d in f.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["arguments"] += d.arguments
    return calls


def _pieces(frames: list[Frame]) -> list[ToolCallDelta]:
    return [d for f in frames for d in f.tool_calls or ()]


# Two parallel calls whose pieces interleave (index 1 starts before index 0 is done), with
# arguments in multi-byte UTF-8 cut mid-word, and text before them.
CALL_PIECES = [
    ToolCallDelta(0, "call_a", "search", ""),
    ToolCallDelta(0, None, None, '{"q": "naï'),
    ToolCallDelta(1, "call_b", "weather", '{"city"'),
    ToolCallDelta(0, None, None, 've ☃ 🎉"}'),
    ToolCallDelta(1, None, None, ': "Zürich 🌧"}'),
]
EXPECTED_CALLS = {
    0: {"id": "call_a", "name": "search", "arguments": '{"q": "naïve ☃ 🎉"}'},
    1: {"id": "call_b", "name": "weather", "arguments": '{"city": "Zürich 🌧"}'},
}


def _piece(d: ToolCallDelta) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": d.arguments}
    if d.name is not None:
        function["name"] = d.name
    piece: dict[str, Any] = {"index": d.index, "function": function}
    if d.id is not None:
        piece |= {"id": d.id, "type": "function"}
    return piece


TOOL_STREAM = _sse(
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me look."}),
    *(_chunk({"tool_calls": [_piece(d)]}) for d in CALL_PIECES),
    _chunk({}, "tool_calls"),
    _usage(),
)


# --- the request ----------------------------------------------------------------------------


WIRE: dict[str, Any] = {
    "model": "client-alias",
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
                "strict": True,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "parallel_tool_calls": False,
    "logprobs": True,
    "top_logprobs": 3,
    "response_format": {"type": "json_object"},
    "max_completion_tokens": 50,
    "n": 3,
    "seed": 7,
    "stream": False,
    "stream_options": None,
    "user": "u-1",
    "metadata": {"k": "v"},
    "top_k": 5,  # an SDK's extra_body: not OpenAI's
    "chat_template_kwargs": {"enable_thinking": True},
}


async def test_the_clients_body_is_forwarded_verbatim() -> None:
    """Only the model, the stream settings, the choice count and the choice's seed change;
    the registry's defaults fill what the client left out; unknown fields are dropped."""
    async with stubs(StubConfig(tokens=2)) as [stub], _backend(stub) as backend:
        params = SamplingParams(max_tokens=50, temperature=0.7, top_p=0.95, seed=9)
        await _frames(backend, _request(WIRE, params=params))
    expected = {k: v for k, v in WIRE.items() if k not in ("n", "top_k", "chat_template_kwargs")}
    expected |= {
        "model": "up-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 9,  # seed + choice index, as the service gives each choice
        "temperature": 0.7,
        "top_p": 0.95,
    }
    assert stub.stats.bodies == [expected]


async def test_unknown_fields_go_through_where_the_registry_allows() -> None:
    wire = WIRE | {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    async with (
        stubs(StubConfig(tokens=2)) as [stub],
        _backend(stub, forward_unknown_fields=True) as backend,
    ):
        await _frames(backend, _request(wire))
    [body] = stub.stats.bodies
    assert body["top_k"] == 5 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert "n" not in body and body["model"] == "up-model"


async def test_a_completions_body_sends_each_prompt_on_its_own() -> None:
    wire = {"model": "x", "prompt": ["one", "two"], "max_tokens": 5, "echo": False}
    async with stubs(StubConfig(tokens=2)) as [stub], _backend(stub) as backend:
        for prompt in ("one", "two"):
            await _frames(backend, _request(wire, messages=None, prompt=prompt))
    assert [b["prompt"] for b in stub.stats.bodies] == ["one", "two"]
    assert all(b["max_tokens"] == 5 and b["echo"] is False for b in stub.stats.bodies)


async def test_without_wire_the_body_is_rebuilt_with_tools() -> None:
    """/v1/generate and batch lines: rebuilt from the request's fields, tools included."""
    messages = [
        Message("user", "hi"),
        Message("assistant", "", tool_calls=[ToolCall("c1", "f", '{"a": 1}')]),
        Message("tool", "42", tool_call_id="c1"),
    ]
    request = _request(
        messages=messages,
        tools=[ToolSpec("f", {"type": "object"}, "does f")],
        tool_choice="function",
        tool_name="f",
    )
    async with stubs(StubConfig(tokens=2)) as [stub], _backend(stub) as backend:
        await _frames(backend, request)
        await _frames(backend, _request())
    with_tools, plain = stub.stats.bodies
    assert with_tools["messages"][1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert with_tools["messages"][2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert with_tools["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}, "description": "does f"},
        }
    ]
    assert with_tools["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert plain == {
        "model": "up-model",
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.95,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }


# --- the answer -----------------------------------------------------------------------------


async def test_streamed_tool_calls_are_relayed_piece_by_piece() -> None:
    async with stubs(StubConfig(script=TOOL_STREAM)) as [stub], _backend(stub) as backend:
        frames = await _frames(backend, _request(WIRE))
    assert _pieces(frames) == CALL_PIECES  # ids, names, indices and argument pieces as sent
    assert _calls(frames) == EXPECTED_CALLS
    assert "".join(f.text for f in frames) == "Let me look."
    last = frames[-1]
    assert last.finish_reason == "tool_calls"
    assert (last.prompt_tokens, last.completion_tokens) == (11, 7)
    assert all(f.index == 0 for f in frames)


async def test_a_tool_call_only_stream_starts_with_its_first_piece() -> None:
    """No text at all: the calls are the content (and a role-only chunk is not)."""
    script = _sse(
        _chunk({"role": "assistant", "content": None}),
        _chunk({"tool_calls": [_piece(CALL_PIECES[0])]}),
        _chunk({"tool_calls": [_piece(CALL_PIECES[1])]}),
        _chunk({}, "tool_calls"),
    )
    second = script.index(b"data: ", 1)  # a read per event: role, first piece, the rest
    cuts = [second, script.index(b"data: ", second + 1)]
    async with (
        stubs(StubConfig(script=script, script_cuts=cuts)) as [stub],
        _backend(stub) as backend,
    ):
        frames = await _frames(backend, _request())
    assert frames[0].tool_calls == [CALL_PIECES[0]] and frames[0].text == ""
    assert _pieces(frames) == CALL_PIECES[:2]
    assert frames[-1].finish_reason == "tool_calls"
    assert frames[-1].completion_tokens == 2  # no usage: one per chunk with content


async def test_a_non_streamed_answer_keeps_its_calls_reasoning_and_details() -> None:
    """An upstream that ignores `stream`: its whole message is one frame, nothing dropped."""
    answer = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "think first",
                    "refusal": None,
                    "annotations": [{"type": "url_citation", "url_citation": {"url": "u"}}],
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "search", "arguments": '{"q": "naïve ☃ 🎉"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Zürich 🌧"}'},
                        },
                    ],
                },
                "logprobs": {
                    "content": [
                        {
                            "token": "x",
                            "logprob": -0.5,
                            "bytes": [120],
                            "top_logprobs": [{"token": "y", "logprob": -1.0, "bytes": [121]}],
                        }
                    ]
                },
            }
        ],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 9,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 16},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }
    async with (
        stubs(StubConfig(stream=False, answer=answer)) as [stub],
        _backend(stub) as backend,
    ):
        [frame] = await _frames(backend, _request())
    assert _calls([frame]) == EXPECTED_CALLS
    assert [d.index for d in frame.tool_calls or ()] == [0, 1]
    assert frame.reasoning == "think first"
    assert frame.extra == {"annotations": answer["choices"][0]["message"]["annotations"]}
    assert frame.logprobs == [TokenLogprob("x", -0.5, [120], [TopLogprob("y", -1.0, [121])])]
    assert frame.finish_reason == "tool_calls"
    assert frame.cached_tokens == 16
    assert frame.usage_extra == {
        "prompt_tokens_details": {"cached_tokens": 16},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }


LOGPROB = {
    "token": "Hi",
    "logprob": -0.25,
    "bytes": [72, 105],
    "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}],
}
RICH_STREAM = _sse(
    _chunk({"role": "assistant", "content": "", "refusal": None}),
    _chunk({"reasoning_content": "Let me "}),
    _chunk({"reasoning": "think."}),  # vLLM's newer name, Ollama's
    _chunk({"content": "Hi"}, logprobs={"content": [LOGPROB]}),
    _chunk({"content": "!"}, logprobs={"content": [LOGPROB | {"token": "!", "bytes": [33]}]}),
    _chunk({"refusal": "I can't"}),
    _chunk({"refusal": " help."}),
    _chunk({"annotations": [{"type": "url_citation", "url_citation": {"url": "https://a"}}]}),
    _chunk({"content": " done", "future_field": {"x": [1, 2]}}),
    _chunk({}, "content_filter"),
    _usage(
        prompt_tokens_details={"cached_tokens": 8, "audio_tokens": 0},
        completion_tokens_details={"reasoning_tokens": 2},
        cost={"usd": 0.001},
    ),
)


def _check_rich(frames: list[Frame]) -> None:
    assert "".join(f.reasoning or "" for f in frames) == "Let me think."
    assert "".join(f.text for f in frames) == "Hi! done"
    assert [t.token for f in frames for t in f.logprobs or ()] == ["Hi", "!"]
    assert frames[0].reasoning is not None  # reasoning alone starts the stream
    first = next(f.logprobs for f in frames if f.logprobs)[0]
    assert first == TokenLogprob("Hi", -0.25, [72, 105], [TopLogprob("Hi", -0.25, [72, 105])])
    extras = [f.extra for f in frames if f.extra]
    assert extras == [
        {"refusal": "I can't"},
        {"refusal": " help."},
        {"annotations": [{"type": "url_citation", "url_citation": {"url": "https://a"}}]},
        {"future_field": {"x": [1, 2]}},
    ]
    assert next(f for f in frames if f.extra and "future_field" in f.extra).text == " done"
    last = frames[-1]
    assert last.finish_reason == "content_filter"
    assert last.cached_tokens == 8
    assert last.usage_extra == {
        "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2},
        "cost": {"usd": 0.001},
    }


@pytest.mark.parametrize("cut", [False, True], ids=["one read", "a read per event"])
async def test_reasoning_logprobs_refusal_annotations_and_usage_details(cut: bool) -> None:
    cuts = [i for i in range(1, len(RICH_STREAM)) if RICH_STREAM.startswith(b"data: ", i)]
    config = StubConfig(script=RICH_STREAM, script_cuts=cuts if cut else [])
    async with stubs(config) as [stub], _backend(stub) as backend:
        frames = await _frames(backend, _request())
    _check_rich(frames)


async def test_text_only_streams_are_unchanged() -> None:
    """The fast path's frames: text and counts, and no rich field set."""
    async with stubs(StubConfig(tokens=5)) as [stub], _backend(stub) as backend:
        frames = await _frames(backend, _request())
    assert "".join(f.text for f in frames) == "tok " * 5
    for f in frames:
        assert (f.tool_calls, f.reasoning, f.logprobs, f.extra, f.usage_extra) == (None,) * 5


# --- through the router ---------------------------------------------------------------------


def _router(*upstreams: StubUpstream, retries: int = 2) -> RoutedBackend:
    # lowest_latency tries unmeasured deployments in list order: the first goes first.
    policy = RoutingPolicy(strategy="lowest_latency", retries=retries, backoff_base=0.0)
    config = ModelConfig(
        id="m",
        backend="router",
        routing=policy,
        deployments=[DeploymentConfig(base_url=s.base_url) for s in upstreams],
    )
    deployments = [
        Deployment(
            name=str(i),
            config=d,
            backend=OpenAIUpstreamBackend(
                config.model_copy(
                    update={"backend": "openai", "deployments": [], "base_url": d.base_url}
                )
            ),
            local=False,
        )
        for i, d in enumerate(config.deployments)
    ]
    return RoutedBackend(config, deployments, MemoryBreakers(5, 30.0))


@asynccontextmanager
async def _started(router: RoutedBackend) -> AsyncIterator[RoutedBackend]:
    await router.start()
    try:
        yield router
    finally:
        await router.aclose()


@pytest.mark.parametrize("buffered", [False, True], ids=["streamed", "buffered"])
async def test_a_retry_carries_the_same_frames(buffered: bool) -> None:
    flaky = StubConfig(script=TOOL_STREAM, fail_status=503, fail_times=1)
    async with stubs(flaky) as [stub], _started(_router(stub)) as router:
        frames = await _frames(router, _request(WIRE, buffered=buffered))
    assert _pieces(frames) == CALL_PIECES and _calls(frames) == EXPECTED_CALLS
    assert frames[-1].finish_reason == "tool_calls"
    first, again = stub.stats.bodies
    assert stub.stats.failed == 1 and first == again


@pytest.mark.parametrize("buffered", [False, True], ids=["streamed", "buffered"])
async def test_a_fallback_carries_the_same_frames(buffered: bool) -> None:
    down = StubConfig(fail_status=500)
    async with (
        stubs(down, StubConfig(script=RICH_STREAM)) as [a, b],
        _started(_router(a, b)) as router,
    ):
        frames = await _frames(router, _request(WIRE, buffered=buffered))
    _check_rich(frames)
    assert a.stats.failed == 1 and a.stats.bodies == b.stats.bodies


async def test_a_tool_call_first_frame_counts_as_started() -> None:
    """An upstream that dies after its role-only chunk has sent nothing: retried elsewhere.
    One that dies after a tool call's first piece has started the answer: not retried."""
    role_only = _sse(_chunk({"role": "assistant", "content": ""}), done=False)
    call_first = _sse(_chunk({"tool_calls": [_piece(CALL_PIECES[0])]}), done=False)
    async with (
        stubs(StubConfig(script=role_only), StubConfig(script=TOOL_STREAM)) as [a, b],
        _started(_router(a, b, retries=1)) as router,
    ):
        frames = await _frames(router, _request())
        assert _calls(frames) == EXPECTED_CALLS
        assert (a.stats.requests, b.stats.requests) == (1, 1)
        a.config = b.config = StubConfig(script=call_first)
        got: list[Frame] = []
        with pytest.raises(UpstreamError, match="before finishing"):
            async for frame in router.generate(_request()):
                got.append(frame)
    assert got == [Frame(tool_calls=[CALL_PIECES[0]], tokens=1)]
    assert a.stats.requests + b.stats.requests == 3  # the second request was not retried


# --- any cut of the bytes -------------------------------------------------------------------


def _reassembled(frames: list[Frame]) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    return "".join(f.text for f in frames), _calls(frames), frames[-1].finish_reason


async def test_every_cut_of_a_tool_call_stream_reassembles_exactly() -> None:
    """The stream cut into two reads at every byte boundary (inside JSON, inside `data: `,
    inside a multi-byte character, between the two newlines), then into many reads at random:
    the calls put back together are the calls sent, byte for byte."""
    script = _sse(
        *(_chunk({"tool_calls": [_piece(d)]}) for d in CALL_PIECES),
        _chunk({}, "tool_calls"),
    )
    # Also the same events framed the other way servers do (CRLF, a comment): the line split.
    crlf = b": ping\r\n\r\n" + script.replace(b"\n\n", b"\r\n\r\n")
    expected = ("", EXPECTED_CALLS, "tool_calls")
    rng = random.Random(23)
    async with stubs(StubConfig()) as [stub], _backend(stub) as backend:
        plans = [(script, [k]) for k in range(1, len(script))]
        for body in (script, crlf):
            plans += [
                (body, sorted(rng.sample(range(1, len(body)), rng.randint(3, 12))))
                for _ in range(15)
            ]
        for body, cuts in plans:
            stub.config = StubConfig(script=body, script_cuts=cuts)
            frames = await _frames(backend, _request())
            assert _reassembled(frames) == expected, cuts
            assert _pieces(frames) == CALL_PIECES, cuts
    # (A cut just after `data: [DONE]\n` ends the stream before the stub's last byte.)
    assert stub.stats.requests == len(plans)
