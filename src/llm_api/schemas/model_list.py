"""`/v1/models` wire types. (Named model_list, not models, so it is not mistaken for LLMs or
ORM tables.)"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    """OpenAI's `Model` (id, object, created, owned_by), and our extensions after them."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int | None = None
    tier: Literal["free", "paid"] = "free"
    capabilities: list[str] = Field(
        default_factory=list,
        description="What requests to this model may use beyond text: tools, images, audio, "
        "files, json_schema, logprobs, reasoning. Anything else is refused with 400.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
