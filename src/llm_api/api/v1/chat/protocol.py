"""Chat protocol: the wire request (schemas/chat.py holds its types) checked against the server's
limits and turned into one engine request per choice, with every field the engine contract has:
messages (tool calls, tool results, names), tools, tool choice, sampling, logprobs, and the body
as the client sent it (`wire`, for upstreams to forward)."""

from __future__ import annotations

from typing import Any, Literal

from llm_api.api.v1.sampling import check_lengths, sampling_params, sequence
from llm_api.core.config import Settings
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import ChatCompletionRequest, ChatMessage, NamedToolChoice
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import GenerationRequest, Message, ToolCall, ToolSpec

# A function declared without `parameters` takes none (OpenAI's reading).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolChoiceMode = Literal["none", "auto", "required", "function"]


def message(m: ChatMessage) -> Message:
    calls = None
    if m.tool_calls:
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
    return Message(m.role, m.text(), tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def tools(req: ChatCompletionRequest) -> list[ToolSpec] | None:
    if not req.tools:
        return None
    return [
        ToolSpec(
            name=t.function.name,
            parameters=t.function.parameters
            if t.function.parameters is not None
            else dict(NO_PARAMETERS),
            description=t.function.description,
            strict=bool(t.function.strict),
        )
        for t in req.tools
    ]


def tool_choice(req: ChatCompletionRequest) -> tuple[ToolChoiceMode, str | None]:
    """none | auto | required | function (with the function's name). Unset: auto when there are
    tools, none otherwise, as OpenAI."""
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        return "function", choice.function.name
    if choice is None:
        return ("auto" if req.tools else "none"), None
    if choice == "auto" and not req.tools:
        return "none", None  # nothing to call
    return choice, None


def chat_requests(
    req: ChatCompletionRequest, config: ModelConfig, settings: Settings, request_id: str
) -> list[GenerationRequest]:
    """The engine requests of a chat request, one per choice; 400 (naming `param`) for what the
    server's limits refuse."""
    if len(req.messages) > settings.max_messages:
        raise InvalidRequestError(
            f"At most {settings.max_messages} messages are allowed.", param="messages"
        )
    messages = [message(m) for m in req.messages]
    check_lengths([m.content for m in messages], settings, "messages")
    check_lengths([c.arguments for m in messages for c in m.tool_calls or ()], settings, "messages")
    params = sampling_params(req, config, settings, req.requested_max_tokens)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        params.json_schema = {}
    elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
        params.json_schema = rf.json_schema.schema_ or {}
    params.logprobs = bool(req.logprobs)
    params.top_logprobs = req.top_logprobs or 0
    mode, name = tool_choice(req)
    template = GenerationRequest(
        request_id=request_id,
        model=config.id,
        params=params,
        messages=messages,
        explicit_max_tokens=req.requested_max_tokens is not None,
        user=req.user,
        tools=tools(req),
        tool_choice=mode,
        tool_name=name,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        wire=req.model_dump(mode="json", by_alias=True, exclude_unset=True),
    )
    return [sequence(template, i) for i in range(req.n)]
