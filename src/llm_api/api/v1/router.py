"""Aggregates the /v1 routers."""

from __future__ import annotations

from fastapi import APIRouter

from llm_api.api.v1.endpoints import chat, completions, models, simple

api_router = APIRouter(prefix="/v1")
api_router.include_router(chat.router)
api_router.include_router(completions.router)
api_router.include_router(models.router)
api_router.include_router(simple.router)
