"""The wire encoders (api/v1/*/serving.py), the protocol conversion (api/v1/*/protocol.py) and
the cache entry's replay, driven with hand-made frames: every Frame field reaches the client in
OpenAI's shape, streamed and whole answers agree, and a cached answer replays as the live one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from llm_api.api.v1.chat import protocol as chat_protocol
from llm_api.api.v1.chat.serving import chat_body, chat_chunks
from llm_api.api.v1.completions import protocol as completions_protocol
from llm_api.api.v1.completions.serving import completion_body, completion_chunks
from llm_api.core.config import Settings
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from llm_api.schemas.completions import Completion, CompletionRequest
from llm_api.services.cache.entry import CachedResponse
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.shaping import collect
from llm_api.services.llm.types import Frame, TokenLogprob, ToolCallDelta, TopLogprob
from tests.conftest import test_settings as make_settings

HOSTILE = "a\n\ndata: [DONE]\n\nb\rc\r\n\r\nd: e\n"
TEXTS = [
    HOSTILE,
    "ok",
    'q"uote\\ back',
    "\u2028\u2029 \x00\x1f\x7f",
    "héllo 猫 🐈",
    " ",
    '{"content":',
]


def chat_request(n: int = 1, usage: bool = True, **extra: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "n": n,
        "stream": True,
        **extra,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    return ChatCompletionRequest.model_validate(body)


async def source(frames: list[Frame]) -> AsyncIterator[Frame]:
    for frame in frames:
        yield frame


async def stream(
    req: ChatCompletionRequest, frames: list[Frame], **kw: Any
) -> list[dict[str, Any]]:
    encoded = chat_chunks(req, "r1", kw.pop("model", "m"), source(frames), **kw)
    return [orjson.loads(b) async for b in encoded]


async def whole(req: ChatCompletionRequest, frames: list[Frame], **kw: Any) -> dict[str, Any]:
    answer = await collect(source(frames), req.n, req.n)
    answer.model = "m"
    return chat_body("r1", answer, **kw)


def logprob(token: str, lp: float) -> TokenLogprob:
    alt = TopLogprob(token + "!", lp - 1, list((token + "!").encode()))
    return TokenLogprob(token, lp, list(token.encode()), [alt])


def tool_frames() -> list[Frame]:
    """A choice that thinks, says a little, calls two tools (arguments in pieces, the second
    call interleaved with the first), with upstream extras, logprobs and usage details."""
    return [
        Frame(reasoning="Let me ", extra={"refusal": "I "}),
        Frame(reasoning="think.", extra={"refusal": "won't", "annotations": [{"type": "x"}]}),
        Frame(text="Calling", logprobs=[logprob("Call", -0.5), logprob("ing", -0.25)]),
        Frame(tool_calls=[ToolCallDelta(0, id="call_a", name="get_weather", arguments='{"ci')]),
        Frame(tool_calls=[ToolCallDelta(1, id="call_b", name="get_time", arguments="")]),
        Frame(tool_calls=[ToolCallDelta(0, name="get_weather", arguments='ty": "Pa')]),
        Frame(tool_calls=[ToolCallDelta(1, arguments='{"tz": "UTC"}')]),
        Frame(tool_calls=[ToolCallDelta(0, arguments='ris"}')]),
        Frame(
            finish_reason="tool_calls",
            prompt_tokens=12,
            completion_tokens=9,
            cached_tokens=8,
            usage_extra={"completion_tokens_details": {"reasoning_tokens": 3}},
        ),
    ]


def reassemble(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What a client makes of a stream (as the openai SDK's stream helpers do): per choice, the
    content, reasoning and string extras joined, tool calls by index, logprobs in order."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            c = out.setdefault(
                choice["index"], {"message": {}, "calls": {}, "logprobs": None, "finish": None}
            )
            for key, value in choice["delta"].items():
                if key == "tool_calls":
                    for piece in value:
                        call = c["calls"].setdefault(piece["index"], {"arguments": ""})
                        for field in ("id", "type"):
                            if field in piece:
                                call[field] = piece[field]
                        if "name" in piece["function"]:
                            call["name"] = piece["function"]["name"]
                        call["arguments"] += piece["function"]["arguments"]
                elif isinstance(value, str) and key != "role":
                    c["message"][key] = c["message"].get(key, "") + value
                elif key != "role":
                    c["message"][key] = value
            if choice["logprobs"] is not None:
                c["logprobs"] = c["logprobs"] or {"content": [], "refusal": None}
                c["logprobs"]["content"] += choice["logprobs"]["content"]
            if choice["finish_reason"] is not None:
                c["finish"] = choice["finish_reason"]
    return out


@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize("model", ["m", 'q"uo\\te \u2028 猫', '{"content":'])
async def test_a_text_only_frame_is_spliced_into_the_same_json(index: int, model: str) -> None:
    """The per-token fast path splices the text into its choice's chunk JSON: the result is what
    the general path (a dict dumped whole) and the chunk model give, for any text."""
    req = chat_request(usage=False)
    for text in TEXTS:
        fast = await stream(req, [Frame(text=text, index=index)], model=model)
        general = await stream(req, [Frame(text=text, index=index, extra={})], model=model)
        assert fast == general
        role, content = fast
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert content["choices"][0] == {
            "index": index,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": None,
        }
        assert "system_fingerprint" not in content
        typed = ChatCompletionChunk.model_validate(content)
        assert orjson.loads(typed.model_dump_json()) == content
    for reason in ("stop", "length", "tool_calls", "content_filter"):
        frames = [Frame(index=index), Frame(finish_reason=reason, index=index)]  # type: ignore[arg-type]
        role, finish = await stream(req, frames, model=model)
        assert finish["choices"] == [
            {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        ]
        assert finish["model"] == model and role["id"] == finish["id"] == "chatcmpl-r1"


async def test_tool_call_deltas_name_each_call_once_and_keep_indices() -> None:
    chunks = await stream(chat_request(), tool_frames())
    calls = [
        piece for c in chunks for ch in c["choices"] for piece in ch["delta"].get("tool_calls", [])
    ]
    assert calls == [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"ci'},
        },
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": ""},
        },
        # The repeated name of a later piece is not sent again.
        {"index": 0, "function": {"arguments": 'ty": "Pa'}},
        {"index": 1, "function": {"arguments": '{"tz": "UTC"}'}},
        {"index": 0, "function": {"arguments": 'ris"}'}},
    ]
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["tool_calls"]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)


async def test_reasoning_logprobs_and_extras_reach_the_delta() -> None:
    chunks = await stream(chat_request(), tool_frames())
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"reasoning_content": "Let me ", "refusal": "I "}
    assert deltas[2] == {
        "reasoning_content": "think.",
        "refusal": "won't",
        "annotations": [{"type": "x"}],
    }
    text = chunks[3]["choices"][0]
    assert text["delta"] == {"content": "Calling"}
    assert text["logprobs"] == {
        "content": [
            {
                "token": "Call",
                "logprob": -0.5,
                "bytes": list(b"Call"),
                "top_logprobs": [{"token": "Call!", "logprob": -1.5, "bytes": list(b"Call!")}],
            },
            {
                "token": "ing",
                "logprob": -0.25,
                "bytes": list(b"ing"),
                "top_logprobs": [{"token": "ing!", "logprob": -1.25, "bytes": list(b"ing!")}],
            },
        ],
        "refusal": None,
    }
    assert all(c["choices"][0]["logprobs"] is None for c in chunks[4:] if c["choices"])


async def test_usage_carries_cached_tokens_and_upstream_details() -> None:
    chunks = await stream(chat_request(), tool_frames())
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    body = await whole(chat_request(), tool_frames())
    assert body["usage"] == chunks[-1]["usage"]
    plain = await whole(chat_request(), [Frame(text="x"), Frame(finish_reason="stop")])
    assert "prompt_tokens_details" not in plain["usage"]


async def test_whole_message_has_refusal_null_and_content_null_for_only_tool_calls() -> None:
    only_calls = [
        Frame(tool_calls=[ToolCallDelta(0, id="c1", name="f", arguments="{}")]),
        Frame(finish_reason="tool_calls", prompt_tokens=3, completion_tokens=2),
    ]
    body = await whole(chat_request(), only_calls)
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert "system_fingerprint" not in body
    text = await whole(chat_request(), [Frame(text="hi"), Frame(finish_reason="stop")])
    assert text["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert text["choices"][0]["logprobs"] is None
    typed = ChatCompletion.model_validate(body)
    assert orjson.loads(typed.model_dump_json()) == body


async def test_a_fingerprint_is_sent_only_when_there_is_one() -> None:
    frames = [Frame(text="x"), Frame(finish_reason="stop")]
    chunks = await stream(chat_request(), frames, fingerprint="fp_1")
    assert all(c["system_fingerprint"] == "fp_1" for c in chunks)
    assert (await whole(chat_request(), frames, fingerprint="fp_1"))["system_fingerprint"] == "fp_1"


async def test_whole_answer_equals_the_reassembled_stream() -> None:
    """Two choices, frames interleaved: the non-streamed body is the stream put together."""
    first, second = (
        tool_frames(),
        [
            Frame(text="Hello", index=1, logprobs=[logprob("Hello", -0.1)]),
            Frame(
                text=" world",
                index=1,
                logprobs=[logprob(" world", -0.2)],
                extra={"audio": {"id": "a1"}},
            ),
            Frame(finish_reason="length", index=1, prompt_tokens=12, completion_tokens=2),
        ],
    )
    frames = [
        f
        for pair in zip(first, second + [None] * (len(first) - len(second)), strict=True)
        for f in pair
        if f
    ]
    req = chat_request(n=2)
    chunks = await stream(req, frames)
    body = await whole(req, frames)
    streamed = reassemble(chunks)
    for choice in body["choices"]:
        got = streamed[choice["index"]]
        message = dict(choice["message"])
        calls = message.pop("tool_calls", [])
        assert [
            {
                "id": c["id"],
                "type": c["type"],
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for _, c in sorted(got["calls"].items())
        ] == calls
        expected = {k: v for k, v in message.items() if k != "role" and v is not None}
        assert got["message"] == expected
        assert got["logprobs"] == choice["logprobs"]
        assert got["finish"] == choice["finish_reason"]
    assert body["usage"] == chunks[-1]["usage"]
    assert body["usage"]["prompt_tokens"] == 12  # the prompt counts once for n choices
    assert body["choices"][0]["message"]["refusal"] == "I won't"


@pytest.mark.parametrize("reason", ["error", "cancelled"])
async def test_error_and_cancelled_never_reach_the_wire(reason: str) -> None:
    frames = [Frame(text="x"), Frame(finish_reason=reason)]  # type: ignore[arg-type]
    chunks = await stream(chat_request(), frames)
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "stop"
    assert (await whole(chat_request(), frames))["choices"][0]["finish_reason"] == "stop"


# --- completions ---------------------------------------------------------------------------------


def completion_request(**extra: Any) -> CompletionRequest:
    return CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}}
        | extra
    )


async def test_completion_text_is_spliced_into_the_same_json() -> None:
    req = completion_request()
    for text in TEXTS:
        fast = [
            orjson.loads(b)
            async for b in completion_chunks(req, "r", "m", source([Frame(text=text, index=2)]))
        ]
        assert fast[0]["choices"] == [
            {"index": 2, "text": text, "logprobs": None, "finish_reason": None}
        ]
        Completion.model_validate(fast[0])


async def test_completion_legacy_logprobs_streamed_and_whole() -> None:
    req = completion_request(logprobs=1)
    frames = [
        Frame(text="Hello", logprobs=[logprob("Hel", -0.5), logprob("lo", -0.25)]),
        Frame(text=" you", logprobs=[logprob(" you", -1.0)]),
        Frame(finish_reason="stop", prompt_tokens=1, completion_tokens=3),
    ]
    chunks = [orjson.loads(b) async for b in completion_chunks(req, "r", "m", source(frames))]
    assert chunks[1]["choices"][0]["logprobs"] == {
        "tokens": [" you"],
        "token_logprobs": [-1.0],
        "top_logprobs": [{" you!": -2.0}],
        "text_offset": [5],
    }
    answer = await collect(source(frames), 1, 1)
    answer.model = "m"
    body = completion_body("r", answer)
    assert body["choices"][0]["text"] == "Hello you"
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hel", "lo", " you"],
        "token_logprobs": [-0.5, -0.25, -1.0],
        "top_logprobs": [{"Hel!": -1.5}, {"lo!": -1.25}, {" you!": -2.0}],
        "text_offset": [0, 3, 5],
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 4
    Completion.model_validate(body)


# --- cache entries -------------------------------------------------------------------------------


async def test_a_cached_answer_replays_as_the_live_one() -> None:
    """Stored after a live stream with tool calls, reasoning, extras, logprobs and usage details,
    the entry replays through the same encoders to the same chunks and the same whole body."""
    req = chat_request()
    live_frames = tool_frames()
    live = await stream(req, live_frames)
    answer = await collect(source(tool_frames()), 1, 1)
    answer.model = "m"
    stored = CachedResponse.of(answer, 12, 9).model_dump_json()
    entry = CachedResponse.model_validate_json(stored)
    replayed = [orjson.loads(b) async for b in chat_chunks(req, "r1", "m", entry.stream())]
    assert reassemble(replayed) == reassemble(live)
    assert replayed[-1]["usage"] == live[-1]["usage"]
    body = chat_body("r1", entry.answer(1))
    live_body = await whole(req, tool_frames())
    for b in (body, live_body):
        b.pop("created")
    assert body == live_body


def test_an_older_entry_is_a_miss() -> None:
    old = {
        "model": "m",
        "choices": [{"text": "hi", "finish_reason": "stop"}],
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }
    with pytest.raises(ValidationError):
        CachedResponse.model_validate_json(orjson.dumps(old))


# --- protocol ------------------------------------------------------------------------------------

CONFIG = ModelConfig(id="m", backend="openai", base_url="http://127.0.0.1:9/v1")


def settings() -> Settings:
    return make_settings(Path("/nonexistent"))


def test_chat_conversion_fills_every_contract_field() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?", "name": "ann"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "w"}},
                {
                    "type": "function",
                    "function": {"name": "v", "parameters": {"type": "object"}, "strict": True},
                },
            ],
            "logprobs": True,
            "top_logprobs": 3,
            "user": "end-user-1",
            "n": 2,
            "seed": 7,
            "some_vendor_field": {"x": 1},
        }
    )
    seqs = chat_protocol.chat_requests(req, CONFIG, settings(), "rid")
    assert len(seqs) == 2 and seqs[1].params.seed == 8
    seq = seqs[0]
    assert [(m.role, m.content, m.name, m.tool_call_id) for m in seq.messages or []] == [
        ("user", "weather?", "ann", None),
        ("assistant", "", None, None),
        ("tool", "sunny", None, "c1"),
    ]
    calls = (seq.messages or [])[1].tool_calls or []
    assert [(c.id, c.name, c.arguments) for c in calls] == [("c1", "w", "{}")]
    tools = seq.tools or []
    assert [(t.name, t.parameters, t.strict) for t in tools] == [
        ("w", {"type": "object", "properties": {}}, False),
        ("v", {"type": "object"}, True),
    ]
    assert (seq.tool_choice, seq.tool_name, seq.parallel_tool_calls) == ("auto", None, True)
    assert (seq.params.logprobs, seq.params.top_logprobs) == (True, 3)
    assert seq.user == "end-user-1" and seq.request_id == "rid"
    assert seq.wire is not None and seq.wire["some_vendor_field"] == {"x": 1}
    assert "stream" not in seq.wire  # as sent: unset fields stay out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ("none", None)),
        ("required", ("required", None)),
        ({"type": "function", "function": {"name": "w"}}, ("function", "w")),
    ],
)
def test_tool_choice_modes(choice: Any, expected: tuple[str, str | None]) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    if choice is not None:
        body |= {"tool_choice": choice, "parallel_tool_calls": False}
        body["tools"] = [{"type": "function", "function": {"name": "w"}}]
    seq = chat_protocol.chat_requests(
        ChatCompletionRequest.model_validate(body), CONFIG, settings(), "r"
    )[0]
    assert (seq.tool_choice, seq.tool_name) == expected
    assert seq.parallel_tool_calls is (choice is None)


def test_completion_legacy_logprobs_and_refusals() -> None:
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["a", "b"], "logprobs": 2, "n": 2}
    )
    seqs = completions_protocol.completion_requests(req, CONFIG, settings(), "r")
    assert [s.prompt for s in seqs] == ["a", "a", "b", "b"]
    assert all((s.params.logprobs, s.params.top_logprobs) == (True, 2) for s in seqs)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "a", "logprobs": 6})
    for field, value in (("echo", True), ("suffix", "x"), ("best_of", 2)):
        bad = CompletionRequest.model_validate({"model": "m", "prompt": "a", field: value})
        with pytest.raises(InvalidRequestError) as err:
            completions_protocol.completion_requests(bad, CONFIG, settings(), "r")
        assert err.value.param == field


async def test_an_empty_logprobs_list_is_no_logprobs_in_both_shapes() -> None:
    frames = [Frame(text="", logprobs=[]), Frame(finish_reason="stop", logprobs=[])]
    chunks = await stream(chat_request(), frames)
    assert all(ch["logprobs"] is None for c in chunks for ch in c["choices"])
    assert (await whole(chat_request(), frames))["choices"][0]["logprobs"] is None
