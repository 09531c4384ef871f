"""Chat serving: the pipeline's frames as OpenAI's chat chunks (SSE bodies) or as one whole
`chat.completion`. Both read the same frames; the whole response is the state the stream keeps
(shaping.Answer), so a stream reassembles to exactly the non-streamed answer.

The hot path of every stream is a frame that only adds text (one per token from a local model):
its chunk is spliced from the JSON of a chunk serialised once per choice, only the text encoded
anew. Any other frame (tool calls, reasoning, logprobs, upstream extras) is built as a dict and
dumped. Nothing outside this module sees that splice.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from llm_api.schemas.chat import ChatCompletion, ChatCompletionRequest
from llm_api.services.llm.shaping import Answer, ChoiceAnswer, UsageCounter, wire_finish
from llm_api.services.llm.stages import Outcome
from llm_api.services.llm.types import Frame, TokenLogprob

_ROLE = b'{"role":"assistant","content":""}'
_OPEN = b',"logprobs":null,"finish_reason":null}]}'
_TEXT_TAIL = b"}" + _OPEN


def logprobs_body(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """A choice's `logprobs` (OpenAI's shape: token, logprob, bytes, top_logprobs)."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": a.bytes}
                    for a in t.top_logprobs
                ],
            }
            for t in logprobs
        ],
        "refusal": None,
    }


def _head(cid: str, created: int, model: str, fingerprint: str | None, kind: str) -> dict[str, Any]:
    head: dict[str, Any] = {"id": cid, "object": kind, "created": created, "model": model}
    if fingerprint is not None:  # absent rather than null: the spec wants a string
        head["system_fingerprint"] = fingerprint
    return head


class _Choice:
    """What a stream keeps per choice: its chunk's JSON up to the delta (and up to the text of
    a content delta), and which tool calls began."""

    __slots__ = ("calls", "head", "text")

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.text = head + b'{"content":'
        self.calls: set[int] = set()


def _delta(frame: Frame, state: _Choice) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if frame.text:
        delta["content"] = frame.text
    if frame.reasoning:
        delta["reasoning_content"] = frame.reasoning
    if frame.tool_calls:
        calls = []
        for call in frame.tool_calls:
            if call.index in state.calls:
                calls.append({"index": call.index, "function": {"arguments": call.arguments}})
                continue
            # A call's first delta names it; later ones only add arguments (as OpenAI).
            state.calls.add(call.index)
            piece: dict[str, Any] = {"index": call.index}
            if call.id is not None:
                piece["id"] = call.id
            piece["type"] = "function"
            function: dict[str, Any] = {} if call.name is None else {"name": call.name}
            function["arguments"] = call.arguments
            piece["function"] = function
            calls.append(piece)
        delta["tool_calls"] = calls
    if frame.extra:
        delta.update(frame.extra)  # an upstream's fields, verbatim
    return delta


async def chat_chunks(
    req: ChatCompletionRequest,
    request_id: str,
    model: str,
    frames: AsyncIterator[Frame],
    fingerprint: str | None = None,
    out: Outcome | None = None,
) -> AsyncIterator[bytes]:
    """The JSON of each `chat.completion.chunk`: per choice a role chunk, its content chunks, a
    finish chunk; then the usage chunk when `stream_options.include_usage` asks for it."""
    cid, created = f"chatcmpl-{request_id}", int(time.time())
    head = _head(cid, created, model, fingerprint, "chat.completion.chunk")
    prefix = orjson.dumps(head)[:-1] + b',"choices":[{"index":'
    usage = UsageCounter(req.n)
    choices: dict[int, _Choice] = {}
    # aclosing: when the client goes away this generator is closed, and closing must reach
    # the backend now (stop generating, free the model), not whenever the GC gets to it.
    async with aclosing(frames) as source:  # type: ignore[type-var]
        async for frame in source:
            index = frame.index
            state = choices.get(index)
            if state is None:
                state = choices[index] = _Choice(prefix + b"%d" % index + b',"delta":')
                yield state.head + _ROLE + _OPEN
            if (
                frame.tool_calls is None
                and frame.reasoning is None
                and frame.logprobs is None
                and frame.extra is None
            ):
                if frame.text:  # the spliced path
                    yield state.text + orjson.dumps(frame.text) + _TEXT_TAIL
            else:
                delta = _delta(frame, state)
                logprobs = logprobs_body(frame.logprobs) if frame.logprobs else None
                if delta or logprobs is not None:
                    body = orjson.dumps(delta) + b',"logprobs":' + orjson.dumps(logprobs)
                    yield state.head + body + b',"finish_reason":null}]}'
            if frame.finish_reason is not None:
                usage.add(frame)
                reason = orjson.dumps(wire_finish(frame.finish_reason))
                yield state.head + b'{},"logprobs":null,"finish_reason":' + reason + b"}]}"
    if req.stream_options is not None and req.stream_options.include_usage:
        # The frames have ended, so the pipeline has settled `out` (its cost included).
        cost = out.cost_nanos if out is not None else None
        yield orjson.dumps({**head, "choices": [], "usage": usage.body(cost)})


def message_body(choice: ChoiceAnswer) -> dict[str, Any]:
    """A whole assistant message: content (null when the answer is only tool calls), refusal
    (null unless the upstream sent one), tool calls, reasoning, and upstream extras."""
    text, calls = choice.text, choice.tool_calls
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    reasoning = choice.reasoning
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    message.update(choice.extra)
    return message


def chat_body(request_id: str, answer: Answer, fingerprint: str | None = None) -> dict[str, Any]:
    """The whole `chat.completion`, as JSON-ready data."""
    body = _head(
        f"chatcmpl-{request_id}", int(time.time()), answer.model, fingerprint, "chat.completion"
    )
    body["choices"] = [
        {
            "index": c.index,
            "message": message_body(c),
            "logprobs": None if c.logprobs is None else logprobs_body(c.logprobs),
            "finish_reason": wire_finish(c.finish_reason),
        }
        for c in answer.choices
    ]
    body["usage"] = answer.usage.body(answer.cost_nanos)
    return body


def chat_completion(
    request_id: str, answer: Answer, fingerprint: str | None = None
) -> ChatCompletion:
    """The whole response as its typed model (the route's response_model, the batch runner)."""
    return ChatCompletion.model_validate(chat_body(request_id, answer, fingerprint))
