"""Messages protocol: an Anthropic Messages request translated once into the chat family's
request, so the chat protocol builds the engine requests (messages with tool calls and results,
tools, tool choice, sampling) and an upstream forwards an OpenAI chat body (`wire`). Nothing
downstream knows the request came in Anthropic's shape."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from llm_api.api.errors import validation_to_api_error
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.messages import (
    CountTokensRequest,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)

# Anthropic's tool_choice types as the chat family's.
_CHOICE = {"auto": "auto", "any": "required", "none": "none"}


def _image(block: ImageBlock) -> dict[str, Any]:
    src = block.source
    url = src.url if src.type == "url" else f"data:{src.media_type};base64,{src.data}"
    return {"type": "image_url", "image_url": {"url": url or ""}}


def _text(content: str | list[TextBlock | ImageBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(b.text for b in content if isinstance(b, TextBlock))


def _messages(m: InputMessage) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: a user turn's tool results become tool messages
    (first: they answer the previous assistant turn's calls), its text and images one user
    message; an assistant turn's tool_use blocks become its tool_calls."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    if m.role == "assistant":
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        calls = [
            {
                "id": b.id,
                "type": "function",
                "function": {"name": b.name, "arguments": orjson.dumps(b.input).decode()},
            }
            for b in m.content
            if isinstance(b, ToolUseBlock)
        ]
        turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    out: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)}
        for b in m.content
        if isinstance(b, ToolResultBlock)
    ]
    parts: list[dict[str, Any]] = []
    for b in m.content:
        if isinstance(b, TextBlock):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            parts.append(_image(b))
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def chat_body(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat body that asks for the same thing."""
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _text(list(req.system))
        messages.append({"role": "system", "content": system})
    for m in req.messages:
        messages.extend(_messages(m))
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "parameters": t.input_schema,
                    **({"description": t.description} if t.description is not None else {}),
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name or ""}}
        else:
            body["tool_choice"] = _CHOICE[choice.type]
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        body["max_tokens"] = req.max_tokens
        body["stream"] = req.stream
        for name in ("temperature", "top_p"):
            value = getattr(req, name)
            if value is not None:
                body[name] = value
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
        user = (req.metadata or {}).get("user_id")
        if isinstance(user, str) and len(user) <= 256:
            body["user"] = user
    return body


def to_chat(req: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request; 400 (invalid_request_error) for what the chat family refuses."""
    try:
        return ChatCompletionRequest.model_validate(chat_body(req))
    except ValidationError as exc:
        raise validation_to_api_error(RequestValidationError(exc.errors())) from None
