"""Responses protocol: a `/v1/responses` request translated once into the chat request it
means (instructions as a system message, function calls and their outputs as assistant tool
calls and tool messages, `text.format` as `response_format`, `max_output_tokens` as
`max_completion_tokens`). From there the chat protocol makes the engine requests and its `wire`
(what an upstream, which speaks chat completions, is sent), so both families share one path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedFunctionChoice,
    ResponsesRequest,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    for item in req.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            # Calls of one turn (and the text before them) are one assistant message.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request of a Responses request; 400 (naming `param`) for what has no meaning
    here."""
    if req.previous_response_id is not None:
        raise InvalidRequestError(
            "`previous_response_id` is not supported: responses are not stored; send the whole "
            "conversation in `input`.",
            param="previous_response_id",
        )
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req),
        "stream": req.stream,
    }
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    choice = req.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextFormatJSONObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, TextFormatJSONSchema):
        schema = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        # What the chat types refuse (an empty conversation, a tool message without content).
        first = exc.errors()[0]
        raise InvalidRequestError(f"Invalid `input`: {first['msg']}.", param="input") from None
