"""`/v1/chat/completions` wire types (OpenAI's format)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StringConstraints, Tag, field_validator, model_validator

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.common import (
    MAX_TOKENS,
    ResponseFormat,
    ResponseModel,
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


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"{kind}-part" if isinstance(kind, str) else None


# Tagged by `type`. The tags carry a "-" so that api/errors.py leaves them out of `param`
# (pydantic puts the tag in an error's location: `content[0].text-part.text`).
ContentPart = Annotated[
    Annotated[TextPart, Tag("text-part")]
    | Annotated[ImagePart, Tag("image_url-part")]
    | Annotated[AudioPart, Tag("input_audio-part")]
    | Annotated[FilePart, Tag("file-part")]
    | Annotated[RefusalPart, Tag("refusal-part")],
    Discriminator(_part_tag),
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
            raise InvalidRequestError("Function names in `tools` must be unique.", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(
                f"`tool_choice` names `{choice.function.name}`, which is not in `tools`.",
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise InvalidRequestError(
                "`tool_choice` `required` needs `tools`.", param="tool_choice"
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError(
                "`top_logprobs` requires `logprobs` to be true.", param="top_logprobs"
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ----------------------------------------------------------------------------------
# Written by api/v1/chat/serving.py; these types describe them (OpenAPI, typed callers). Fields an
# upstream sent that are not declared here (annotations, audio, ...) pass through.


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CalledFunction(ResponseModel):
    name: str
    arguments: str


class MessageToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(ResponseModel):
    OMIT_NONE = frozenset({"tool_calls", "reasoning_content"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # OpenAI's spec requires the key, null when the model complied
    tool_calls: list[MessageToolCall] | None = None
    reasoning_content: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(ResponseModel):
    OMIT_NONE = frozenset({"system_fingerprint"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # A string or absent in OpenAI's spec, never null (services/llm/fingerprint.py).
    system_fingerprint: str | None = None


class DeltaFunction(ResponseModel):
    OMIT_NONE = frozenset({"name"})

    name: str | None = None
    arguments: str = ""


class DeltaToolCall(ResponseModel):
    """A piece of a call: `id`, `type` and the name in its first piece only."""

    OMIT_NONE = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChoiceDelta(ResponseModel):
    """Only the fields that are set go on the wire: `{"content": "..."}`, and `{}` last."""

    OMIT_NONE = frozenset({"role", "content", "reasoning_content", "tool_calls", "refusal"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    refusal: str | None = None


class ChunkChoice(ResponseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(ResponseModel):
    OMIT_NONE = frozenset({"system_fingerprint", "usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
