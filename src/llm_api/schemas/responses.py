"""`/v1/responses` request types (OpenAI's Responses format). The response objects are written by
api/v1/responses/serving.py in the shape of the openai SDK's `Response` and stream events."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StringConstraints, Tag, model_validator

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import ToolName
from llm_api.schemas.common import MAX_TOKENS, OpenAIRequest, StrictModel


class InputText(StrictModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer sent back
    text: str


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputText], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    arguments: str


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    output: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


def _item_tag(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "")
    return f"{kind}-item"


# Tagged by `type` (a message may leave it out). The "-" keeps tags out of an error's `param`.
InputItem = Annotated[
    Annotated[MessageItem, Tag("message-item")]
    | Annotated[FunctionCallItem, Tag("function_call-item")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output-item")],
    Discriminator(_item_tag),
]


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(StrictModel):
    type: Literal["function"]
    name: ToolName


class TextFormatText(StrictModel):
    type: Literal["text"]


class TextFormatJSONObject(StrictModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(StrictModel):
    type: Literal["json_schema"]
    name: Annotated[str, StringConstraints(max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextConfig(StrictModel):
    format: (
        Annotated[
            TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
            Field(discriminator="type"),
        ]
        | None
    ) = None


class ResponsesRequest(OpenAIRequest):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    input: (
        Annotated[str, StringConstraints(min_length=1)]
        | Annotated[list[InputItem], Field(min_length=1)]
    )
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    text: TextConfig | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    stream: bool = False
    # Default true (OpenAI's): the response is kept (services/response_store.py).
    store: bool | None = None
    previous_response_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = (
        None
    )
    # OpenAI's fields that would change the answer and that we do not implement: a 400 rather
    # than an answer that silently ignored them. Others an SDK sends (`include`, `truncation`,
    # `reasoning`, `service_tier`, `prompt_cache_key`, `safety_identifier`, `stream_options`,
    # ...) are tolerated and ignored (docs/api-families.md).
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    top_logprobs: int | None = None
    # Extra output to include: nothing we answer has more to include, except logprobs (refused).
    include: Annotated[list[str], Field(max_length=32)] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ResponsesRequest:
        refused = {
            "conversation": "use `previous_response_id` to continue a conversation",
            "prompt": "stored prompt templates are not supported; send `instructions`",
            "background": "background responses are not supported",
            "top_logprobs": "logprobs are not supported on /v1/responses; use /v1/chat/completions",
        }
        for name, why in refused.items():
            if getattr(self, name) not in (None, False, 0):
                raise InvalidRequestError(f"`{name}` is not supported: {why}.", param=name)
        if "message.output_text.logprobs" in (self.include or ()):
            raise InvalidRequestError(
                "`include` `message.output_text.logprobs` is not supported: "
                f"{refused['top_logprobs']}.",
                param="include",
            )
        return self
