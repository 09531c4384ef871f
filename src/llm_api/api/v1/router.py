"""Aggregates the /v1 routers."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from llm_api.api.security import authenticate
from llm_api.api.v1.endpoints import (
    admin,
    auth,
    batches,
    chat,
    completions,
    dashboard,
    files,
    keys,
    models,
    simple,
    usage,
    users,
)

# Deny by default: every /v1 route authenticates unless marked @public (api.security).
api_router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])
api_router.include_router(chat.router)
api_router.include_router(completions.router)
api_router.include_router(models.router)
api_router.include_router(simple.router)
api_router.include_router(auth.router)
api_router.include_router(keys.router)
api_router.include_router(users.router)
api_router.include_router(admin.router)
api_router.include_router(dashboard.router)
api_router.include_router(usage.router)
api_router.include_router(files.router)
api_router.include_router(batches.router)
