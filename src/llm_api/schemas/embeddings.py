"""`/v1/embeddings` wire types, as OpenAI's: `input` is a string, an array of strings, an array
of token ids or an array of token-id arrays; vectors come back as floats or base64 (little-endian
float32, what the openai SDK asks for by default)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from llm_api.schemas.common import OpenAIRequest

# OpenAI's own bound on inputs per request.
MAX_EMBEDDING_INPUTS = 2048
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
EmbeddingInput = str | list[str] | list[TokenId] | list[list[TokenId]]


class EmbeddingRequest(OpenAIRequest):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    # Emptiness and the input count are checked by the service, with messages that say which.
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Annotated[str, StringConstraints(max_length=256)] | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    cost: float | None = None  # USD; inputs served from the cache cost nothing


class CreateEmbeddingResponse(BaseModel):
    """The documented response shape (the route writes the same JSON with orjson, whose numpy
    support serializes 2,048 vectors without a Python float object per component)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
