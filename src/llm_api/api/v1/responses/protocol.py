"""Responses protocol: a `/v1/responses` request translated once into the chat request it
means (instructions as a system message, function calls and their outputs as assistant tool
calls and tool messages, `text.format` as `response_format`, `max_output_tokens` as
`max_completion_tokens`). From there the chat protocol makes the engine requests and its `wire`
(what an upstream, which speaks chat completions, is sent), so both families share one path.

With `previous_response_id` the conversation is the stored response's input items and output
items, then the new input (its instructions are not carried over, as OpenAI's are not).
`input_items` writes the new input in the stored form (each item with an `id` and a `status`,
text as content parts), the form `GET /v1/responses/{id}/input_items` answers."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    NamedFunctionChoice,
    ResponsesRequest,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)

_ITEMS: TypeAdapter[list[Any]] = TypeAdapter(list[InputItem])


def _items(req: ResponsesRequest) -> list[Any]:
    if isinstance(req.input, str):
        return [MessageItem(role="user", content=req.input)]
    return list(req.input)


def _own_id(item: Any, default: str) -> str:
    value = (item.model_extra or {}).get("id")
    return value if isinstance(value, str) and value else default


def _parts(item: MessageItem) -> list[dict[str, Any]]:
    if isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        part: dict[str, Any] = {"type": kind, "text": item.content}
        if kind == "output_text":
            part["annotations"] = []
        return [part]
    return [p.model_dump() for p in item.content]


def input_items(req: ResponsesRequest, request_id: str) -> list[dict[str, Any]]:
    """The request's input as stored items: the client's ids kept, others made from the
    request id (`_in<n>`: never one of the output's ids)."""
    stored: list[dict[str, Any]] = []
    for n, item in enumerate(_items(req)):
        if isinstance(item, MessageItem):
            stored.append(
                {
                    "id": _own_id(item, f"msg_{request_id}_in{n}"),
                    "type": "message",
                    "role": item.role,
                    "content": _parts(item),
                    "status": "completed",
                }
            )
        elif isinstance(item, FunctionCallItem):
            stored.append(
                {
                    "id": _own_id(item, f"fc_{request_id}_in{n}"),
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": "completed",
                }
            )
        else:
            output = item.output
            stored.append(
                {
                    "id": _own_id(item, f"fco_{request_id}_in{n}"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output
                    if isinstance(output, str)
                    else [p.model_dump() for p in output],
                    "status": "completed",
                }
            )
    return stored


def _messages(instructions: str | None, items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
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


def chat_request(
    req: ResponsesRequest, history: list[dict[str, Any]] | None = None
) -> ChatCompletionRequest:
    """The chat request of a Responses request; `history`: the stored items of the response
    it continues (`previous_response_id`), before its input. 400 (naming `param`) for what has
    no meaning here."""
    items = _ITEMS.validate_python(history) + _items(req) if history else _items(req)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req.instructions, items),
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
