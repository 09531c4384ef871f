"""`/v1/messages` wire types (Anthropic's Messages API). Requests are translated into the chat
family's request (api/v1/messages/protocol.py); responses are built as dicts by
api/v1/messages/serving.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from llm_api.schemas.common import MAX_TOKENS, OpenAIRequest, StrictModel

ToolName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str


class ImageSource(StrictModel):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(StrictModel):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    name: ToolName
    input: dict[str, Any]


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")
]


class InputMessage(StrictModel):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(min_length=1)]


class Tool(StrictModel):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(OpenAIRequest):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    # Accepted for compatibility; the engine samples without a top-k cut (it is not forwarded).
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None
    stream: bool = False


class CountTokensRequest(OpenAIRequest):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
