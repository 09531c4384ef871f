"""`/v1/chat/completions` wire types (OpenAI's format)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from llm_api.schemas.common import (
    MAX_TOKENS,
    ResponseFormat,
    SamplingFields,
    StrictModel,
    Usage,
)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: Annotated[str, StringConstraints(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(StrictModel):
    data: str
    format: Annotated[str, StringConstraints(min_length=1, max_length=16)]


class AudioPart(StrictModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(StrictModel):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(StrictModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]
# What each non-text part needs the model to support (registry capabilities).
PART_CAPABILITY = {"image_url": "images", "input_audio": "audio", "file": "files"}


class FunctionCall(StrictModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    arguments: str


class ToolCallItem(StrictModel):
    """A call the assistant made, in the conversation history."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


ToolName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
]


class FunctionDefinition(StrictModel):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: ToolName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: Annotated[str, StringConstraints(max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(min_length=1)] | None = None
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> ChatMessage:
        # An assistant turn that only called tools has no content; every other turn has some.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool messages need the tool_call_id they answer")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or [] if isinstance(p, TextPart))

    def part_types(self) -> set[str]:
        """The content part types beyond text (image_url, input_audio, file, refusal)."""
        if not isinstance(self.content, list):
            return set()
        return {p.type for p in self.content if p.type != "text"}


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _not_all_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() or m.tool_calls or m.part_types() for m in v):
            raise ValueError("at least one message must have non-empty content")
        return v

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names `{choice.function.name}`, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice `required` needs tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ----------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # OpenAI's spec requires the key, null when the model complied


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # A string or absent in OpenAI's spec, never null (services/llm/fingerprint.py).
    system_fingerprint: str | None = Field(None, exclude_if=lambda v: v is None)


class ChoiceDelta(BaseModel):
    """Only the fields that are set go on the wire: `{"content": "..."}`, and `{}` last."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _set_fields_only(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.role is not None:
            out["role"] = self.role
        if self.content is not None:
            out["content"] = self.content
        return out


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = Field(None, exclude_if=lambda v: v is None)
