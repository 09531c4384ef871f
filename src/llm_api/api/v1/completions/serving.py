"""Completions serving: the pipeline's frames as legacy `text_completion` chunks (SSE bodies) or
one whole response, from the same frames (see api/v1/chat/serving.py). A frame with only text is
spliced into its choice's chunk JSON; any other is built as a dict."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from llm_api.schemas.completions import Completion, CompletionRequest
from llm_api.services.llm.shaping import Answer, UsageCounter, wire_finish
from llm_api.services.llm.stages import Outcome
from llm_api.services.llm.types import Frame, TokenLogprob

_TEXT_TAIL = b',"logprobs":null,"finish_reason":null}]}'


def legacy_logprobs(logprobs: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """The legacy shape: parallel lists, alternatives as {token: logprob}, and each token's
    character offset in the choice's text (`offset`: where this piece starts); and the offset
    where the next piece starts.

    Offsets count characters from the tokens' bytes, not their `token` strings: a token that
    holds part of a multi-byte character is written with `\\xNN` escapes, which are not the
    text's characters. Such a token's offset is the character its first byte belongs to."""
    offsets = []
    for t in logprobs:
        raw = t.bytes
        if raw is None:  # an upstream's entry without bytes: its text is the token
            offsets.append(offset)
            offset += len(t.token)
            continue
        continues = bool(raw) and raw[0] & 0xC0 == 0x80 and offset > 0
        offsets.append(offset - 1 if continues else offset)
        offset += sum(1 for b in raw if b & 0xC0 != 0x80)  # characters begun
    body = {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in logprobs],
        "text_offset": offsets,
    }
    return body, offset


def _head(request_id: str, model: str, fingerprint: str | None) -> dict[str, Any]:
    head: dict[str, Any] = {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if fingerprint is not None:
        head["system_fingerprint"] = fingerprint
    return head


async def completion_chunks(
    req: CompletionRequest,
    request_id: str,
    model: str,
    frames: AsyncIterator[Frame],
    fingerprint: str | None = None,
    out: Outcome | None = None,
) -> AsyncIterator[bytes]:
    head = _head(request_id, model, fingerprint)
    prefix = orjson.dumps(head)[:-1] + b',"choices":[{"index":'
    usage = UsageCounter(req.n)
    heads: dict[int, bytes] = {}
    # Per choice, where the next token's text offset starts (counted from the tokens' bytes:
    # a frame's text can hold back part of a character that its tokens have begun).
    offsets: dict[int, int] = {}
    tracked = req.logprobs is not None  # text that came without logprobs still moves them
    async with aclosing(frames) as source:  # type: ignore[type-var]
        async for frame in source:
            index = frame.index
            choice = heads.get(index)
            if choice is None:
                choice = heads[index] = prefix + b"%d" % index + b',"text":'
            if not frame.logprobs:
                if frame.text:
                    yield choice + orjson.dumps(frame.text) + _TEXT_TAIL
                    if tracked:
                        offsets[index] = offsets.get(index, 0) + len(frame.text)
            else:
                body, offsets[index] = legacy_logprobs(frame.logprobs, offsets.get(index, 0))
                logprobs = orjson.dumps(body)
                yield (
                    choice
                    + orjson.dumps(frame.text)
                    + b',"logprobs":'
                    + logprobs
                    + b',"finish_reason":null}]}'
                )
            if frame.finish_reason is not None:
                usage.add(frame)
                reason = orjson.dumps(wire_finish(frame.finish_reason))
                yield choice + b'"","logprobs":null,"finish_reason":' + reason + b"}]}"
    if req.stream_options is not None and req.stream_options.include_usage:
        # The frames have ended, so the pipeline has settled `out` (its cost included).
        cost = out.cost_nanos if out is not None else None
        yield orjson.dumps({**head, "choices": [], "usage": usage.body(cost)})


def completion_body(
    request_id: str, answer: Answer, fingerprint: str | None = None
) -> dict[str, Any]:
    body = _head(request_id, answer.model, fingerprint)
    body["choices"] = [
        {
            "index": c.index,
            "text": c.text,
            "logprobs": None if c.logprobs is None else legacy_logprobs(c.logprobs, 0)[0],
            "finish_reason": wire_finish(c.finish_reason),
        }
        for c in answer.choices
    ]
    body["usage"] = answer.usage.body(answer.cost_nanos)
    return body


def completion(request_id: str, answer: Answer, fingerprint: str | None = None) -> Completion:
    return Completion.model_validate(completion_body(request_id, answer, fingerprint))
