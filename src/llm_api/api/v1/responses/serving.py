"""Responses serving: the pipeline's frames as OpenAI's `response` object or as its stream of
events (response.created … response.completed, each with its `sequence_number`).

Output items: the assistant's text as one `message` item (when it said something, or when it
called nothing), then one `function_call` item per tool call. Ids are derived from the request
id (`resp_`, `msg_`, `fc_`), so a stream's items and its final `response` agree, and the final
`response` of a stream is built by the same function as the non-streamed answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import orjson

from llm_api.api.streaming import error_payload
from llm_api.schemas.responses import ResponsesRequest
from llm_api.services.llm.shaping import Answer, ChoiceAnswer, UsageCounter
from llm_api.services.llm.stages import Outcome
from llm_api.services.llm.types import Frame
from llm_api.services.money.prices import usd

# Engine finish → (status, incomplete_details.reason).
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _usage(usage: UsageCounter, cost_nanos: int | None) -> dict[str, Any]:
    details = usage.extra.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    body: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        # OpenAI's schema requires cache_write_tokens: no prompt cache is written for a client.
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens or 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": usage.total_tokens,
    }
    if cost_nanos is not None:
        body["cost"] = usd(cost_nanos)  # an extra field, as in chat's usage (docs/usage.md)
    return body


def _tool_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}


def response_body(
    req: ResponsesRequest,
    request_id: str,
    model: str,
    created: int,
    output: list[dict[str, Any]],
    *,
    status: str,
    usage: UsageCounter | None = None,
    incomplete: str | None = None,
    error: dict[str, Any] | None = None,
    cost_nanos: int | None = None,
) -> dict[str, Any]:
    """A `response` object (the SDK's `Response`), echoing the request's settings."""
    fmt = req.text.format if req.text is not None else None
    body = {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": req.store is not False,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": {
            "format": {"type": "text"}
            if fmt is None
            else fmt.model_dump(by_alias=True, exclude_none=True)
        },
        "tool_choice": _tool_choice(req),
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict if t.strict is not None else True,
            }
            for t in req.tools or ()
        ],
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": "disabled",
        "metadata": req.metadata or {},
    }
    # Objects or strings when present (OpenAI's schema), absent otherwise: usage until the end.
    if usage is not None:
        body["usage"] = _usage(usage, cost_nanos)
    if req.user is not None:
        body["user"] = req.user
    return body


def _status(finish: str | None) -> tuple[str, str | None]:
    reason = _INCOMPLETE.get(finish or "")
    return ("incomplete", reason) if reason else ("completed", None)


def _message(request_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "type": "message",
        "id": f"msg_{request_id}",
        "status": status,
        "role": "assistant",
        "content": content if status != "in_progress" else [],
    }


def _call(
    request_id: str, index: int, call_id: str | None, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{request_id}_{index}",
        "call_id": call_id or f"call_{request_id}_{index}",
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(request_id: str, choice: ChoiceAnswer) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    calls = choice.tool_calls
    if choice.text or not calls:
        items.append(_message(request_id, choice.text, "completed"))
    for i, c in enumerate(calls):
        items.append(_call(request_id, i, c.id or None, c.name, c.arguments, "completed"))
    return items


def response_object(req: ResponsesRequest, request_id: str, answer: Answer) -> dict[str, Any]:
    """The whole `response` (one choice: the Responses API has no `n`)."""
    choice = answer.choices[0]
    status, incomplete = _status(choice.finish_reason)
    return response_body(
        req,
        request_id,
        answer.model,
        int(time.time()),
        output_items(request_id, choice),
        status=status,
        usage=answer.usage,
        incomplete=incomplete,
        cost_nanos=answer.cost_nanos,
    )


class _Stream:
    """The event writer's state: the next sequence number and the items opened so far."""

    def __init__(self, request_id: str) -> None:
        self.rid = request_id
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # in output order, updated as they fill
        self.message: int | None = None  # output_index of the open message
        self.text: list[str] = []
        self.calls: dict[int, tuple[int, list[str]]] = {}  # call index → (output_index, args)
        self.done: set[int] = set()

    def event(self, kind: str, **fields: Any) -> bytes:
        """One whole SSE event, named by its type (`event:` line) as OpenAI frames them."""
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def open_message(self) -> list[bytes]:
        self.message = len(self.items)
        item = _message(self.rid, "", "in_progress")
        self.items.append(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.event("response.output_item.added", output_index=self.message, item=item),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self.message,
                content_index=0,
                part=part,
            ),
        ]

    def close(self, index: int) -> list[bytes]:
        """The done events of the item at `index` (each item closes once)."""
        if index in self.done:
            return []
        self.done.add(index)
        item = self.items[index]
        if item["type"] == "message":
            text = "".join(self.text)
            final = _message(self.rid, text, "completed")
            self.items[index] = final
            part = final["content"][0]
            ids = {"item_id": final["id"], "output_index": index, "content_index": 0}
            return [
                self.event("response.output_text.done", **ids, text=text, logprobs=[]),
                self.event("response.content_part.done", **ids, part=part),
                self.event("response.output_item.done", output_index=index, item=final),
            ]
        args = next("".join(a) for i, a in self.calls.values() if i == index)
        item = {**item, "arguments": args, "status": "completed"}
        self.items[index] = item
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=args,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def frame(self, frame: Frame) -> list[bytes]:
        out: list[bytes] = []
        if frame.text:
            if self.message is None:
                out += self.open_message()
            self.text.append(frame.text)
            out.append(
                self.event(
                    "response.output_text.delta",
                    item_id=f"msg_{self.rid}",
                    output_index=self.message,
                    content_index=0,
                    delta=frame.text,
                    logprobs=[],
                )
            )
        for delta in frame.tool_calls or ():
            state = self.calls.get(delta.index)
            if state is None:
                if self.message is not None:
                    out += self.close(self.message)  # the text of a turn comes before its calls
                index = len(self.items)
                item = _call(
                    self.rid, len(self.calls), delta.id, delta.name or "", "", "in_progress"
                )
                self.items.append(item)
                state = self.calls[delta.index] = (index, [])
                out.append(self.event("response.output_item.added", output_index=index, item=item))
            if delta.arguments:
                state[1].append(delta.arguments)
                out.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self.items[state[0]]["id"],
                        output_index=state[0],
                        delta=delta.arguments,
                    )
                )
        return out


OnDone = Callable[[dict[str, Any]], Awaitable[None]]


async def response_events(
    req: ResponsesRequest,
    request_id: str,
    model: str,
    frames: AsyncIterator[Frame],
    out: Outcome | None = None,
    on_done: OnDone | None = None,
) -> AsyncIterator[bytes]:
    """Each stream event, whole (for api/streaming's `event_frames`). An error after the start
    ends the stream with `response.failed` (its `error` the OpenAI error object), as OpenAI
    does. `on_done` is given the final response (completed or incomplete) before its event is
    sent, so a stored response can be continued as soon as the client has seen it end; if it
    fails, the stream ends with `response.failed` instead."""
    created = int(time.time())
    s = _Stream(request_id)
    usage = UsageCounter(1)
    finish: str | None = None

    def body(status: str, **kw: Any) -> dict[str, Any]:
        if "usage" in kw and out is not None:  # the frames have ended: `out` is settled
            kw["cost_nanos"] = out.cost_nanos
        return response_body(req, request_id, model, created, s.items, status=status, **kw)

    yield s.event("response.created", response=body("in_progress"))
    yield s.event("response.in_progress", response=body("in_progress"))
    try:
        # aclosing: a client that goes away must reach the backend now (stop, free the model).
        async with aclosing(frames) as source:  # type: ignore[type-var]
            async for frame in source:
                for event in s.frame(frame):
                    yield event
                if frame.finish_reason is not None:
                    usage.add(frame)
                    finish = frame.finish_reason
    except Exception as exc:
        error = error_payload(exc)["error"]
        # OpenAI's `ResponseError.code` is an enum: ours map to its server_error.
        code = "rate_limit_exceeded" if error.get("code") == "rate_limit_exceeded" else None
        failed = {"code": code or "server_error", "message": error["message"]}
        yield s.event("response.failed", response=body("failed", usage=usage, error=failed))
        return
    if finish == "error":
        failed = {"code": "server_error", "message": "The model failed while answering."}
        yield s.event("response.failed", response=body("failed", usage=usage, error=failed))
        return
    if not s.items:  # nothing said and nothing called: an empty message, as the whole answer
        for event in s.open_message():
            yield event
    for index in range(len(s.items)):
        for event in s.close(index):
            yield event
    status, incomplete = _status(finish)
    kind = "response.completed" if status == "completed" else "response.incomplete"
    final = body(status, usage=usage, incomplete=incomplete)
    if on_done is not None:
        try:
            await on_done(final)
        except Exception as exc:
            error = error_payload(exc)["error"]
            failed = {"code": "server_error", "message": error["message"]}
            yield s.event("response.failed", response=body("failed", usage=usage, error=failed))
            return
    yield s.event(kind, response=final)
