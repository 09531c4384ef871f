"""`/v1/models` wire types. (Named model_list, not models, so it is not mistaken for LLMs or
ORM tables.)"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int | None = None
    tier: Literal["free", "paid"] = "free"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
