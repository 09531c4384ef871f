"""Messages serving: the pipeline's frames in Anthropic's shape, as the named SSE events of a
stream (message_start, content blocks, message_delta, message_stop) or as one whole `message`.
Both read the same frames; the whole message is built from the state the stream keeps
(shaping.Answer), so a stream reassembles to the non-streamed message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
import structlog

from llm_api.api.errors import anthropic_error
from llm_api.core.exceptions import APIError, ServerError
from llm_api.services.llm.shaping import Answer
from llm_api.services.llm.stages import Outcome
from llm_api.services.llm.types import Frame
from llm_api.services.money.prices import usd

log = structlog.get_logger(__name__)

# The pipeline's finish reasons as Anthropic's stop reasons. A stop string and the end of turn
# both finish as "stop"; a local engine's finishing frame names the stop string that matched
# (`stop_sequence`), an upstream's never does (both are then `end_turn`).
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_STOP["content_filter"] = "refusal"
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def stop_reason(finish: str | None, called: bool, sequence: str | None = None) -> str:
    """`called`: the answer has tool calls; Anthropic then says `tool_use` even where the engine
    ended a forced call with "stop" (as OpenAI does for a named tool_choice). `sequence`: the
    stop string that ended it, if the engine said (`stop_sequence`)."""
    if finish in ("error", "cancelled"):
        raise ServerError("The server had an error while generating the response.")
    reason = _STOP.get(finish or "stop", "end_turn")
    if called and reason == "end_turn":
        return "tool_use"
    return "stop_sequence" if sequence is not None and reason == "end_turn" else reason


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the `input` object (the engine's tool grammar makes them JSON)."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def error_event(exc: Exception) -> bytes:
    """An error after the stream began: `event: error` with Anthropic's error body."""
    if not isinstance(exc, APIError):
        log.error("stream_failed", exc_info=exc)
        exc = ServerError("The server had an error while generating the response.")
    return b"event: error\ndata: " + orjson.dumps(anthropic_error(exc)[1]) + b"\n\n"


def _head(message_id: str, model: str, input_tokens: int) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }


async def message_events(
    message_id: str,
    model: str,
    frames: AsyncIterator[Frame],
    input_tokens: int | None = None,
    out: Outcome | None = None,
) -> AsyncIterator[bytes]:
    """The events of one streamed message (one choice: Anthropic has no `n`). `input_tokens`:
    the prompt's tokens when known before the end (a local model counted them in `prepare`);
    otherwise message_start says 0 and message_delta the count. message_delta comes once the
    frames have ended, so that its usage carries the request's settled `cost` (from `out`)."""
    ending: tuple[dict[str, Any], dict[str, Any]] | None = None  # message_delta's parts
    started = False
    block = -1  # the open content block's index, -1: none
    kind = ""  # its type: text | tool_use
    call = -1  # the open tool_use block's call index
    async with aclosing(frames) as source:  # type: ignore[type-var]
        async for frame in source:
            if not started:
                started = True
                head = _head(message_id, model, input_tokens or frame.prompt_tokens or 0)
                yield _event("message_start", {"message": head})
            if frame.text:
                if kind != "text":
                    if block >= 0:
                        yield _event("content_block_stop", {"index": block})
                    block, kind = block + 1, "text"
                    start = {"index": block, "content_block": {"type": "text", "text": ""}}
                    yield _event("content_block_start", start)
                delta: dict[str, Any] = {"type": "text_delta", "text": frame.text}
                yield _event("content_block_delta", {"index": block, "delta": delta})
            for piece in frame.tool_calls or ():
                if kind != "tool_use" or piece.index != call:
                    if block >= 0:
                        yield _event("content_block_stop", {"index": block})
                    block, kind, call = block + 1, "tool_use", piece.index
                    content: dict[str, Any] = {
                        "type": "tool_use",
                        "id": piece.id,
                        "name": piece.name,
                        "input": {},
                    }
                    yield _event("content_block_start", {"index": block, "content_block": content})
                if piece.arguments:
                    delta = {"type": "input_json_delta", "partial_json": piece.arguments}
                    yield _event("content_block_delta", {"index": block, "delta": delta})
            if frame.finish_reason is not None:
                sequence = frame.stop_sequence
                reason = stop_reason(frame.finish_reason, call >= 0, sequence)
                if block >= 0:
                    yield _event("content_block_stop", {"index": block})
                usage: dict[str, Any] = {
                    "input_tokens": frame.prompt_tokens or 0,
                    "output_tokens": frame.completion_tokens or 0,
                }
                matched = sequence if reason == "stop_sequence" else None
                stop = {"stop_reason": reason, "stop_sequence": matched}
                ending = stop, usage
    if ending is not None:
        stop, usage = ending
        if out is not None:
            usage["cost"] = usd(out.cost_nanos)
        yield _event("message_delta", {"delta": stop, "usage": usage})
        yield _event("message_stop", {})


def message_body(message_id: str, answer: Answer) -> dict[str, Any]:
    """The whole `message`."""
    choice = answer.choices[0]
    content: list[dict[str, Any]] = []
    if choice.text:
        content.append({"type": "text", "text": choice.text})
    for c in choice.tool_calls:
        content.append(
            {"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)}
        )
    body = _head(message_id, answer.model, answer.usage.prompt_tokens)
    body["content"] = content
    reason = stop_reason(choice.finish_reason, bool(choice.calls), choice.stop_sequence)
    body["stop_reason"] = reason
    body["stop_sequence"] = choice.stop_sequence if reason == "stop_sequence" else None
    body["usage"]["output_tokens"] = answer.usage.completion_tokens
    if answer.cost_nanos is not None:
        body["usage"]["cost"] = usd(answer.cost_nanos)  # an extra field (docs/usage.md)
    return body
