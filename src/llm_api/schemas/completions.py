"""Legacy `/v1/completions` wire types, and the guide's simple `/v1/generate` and `/v1/stream`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from llm_api.schemas.common import (
    MAX_TOKENS,
    OpenAIRequest,
    ResponseModel,
    SamplingFields,
    Usage,
)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    response_format: None = None
    # Legacy logprobs: how many alternatives per token (0..5); each token's own is always given.
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class LegacyLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: LegacyLogprobs | None = None


class Completion(ResponseModel):
    OMIT_NONE = frozenset({"system_fingerprint", "usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Absent, never null, in OpenAI's spec (`usage` rides on the last stream chunk only).
    usage: Usage | None = None
    system_fingerprint: str | None = None


class GenerateRequest(OpenAIRequest):
    """The guide's simple API. `model` defaults to the registry's default model."""

    prompt: Annotated[str, Field(min_length=1)]
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    model: str | None = None


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
