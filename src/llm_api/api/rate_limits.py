"""Rate limits of routes without a model (login, key creation, batches and files), called from
their endpoints.
Completions are limited inside the LLM service (services/rate_limit), after tokenization."""

from __future__ import annotations

from typing import Literal

from fastapi import Request

from llm_api.core.state import AppState
from llm_api.services.llm.types import RequestContext


async def limit_route(
    request: Request, route: Literal["login", "key_creation"], account: str | None
) -> None:
    """429 when this client IP or this account has used up the route's limit."""
    state: AppState = request.app.state.llm_api
    if state.rate_limiter is None:
        return
    client_ip = request.client.host if request.client else None
    await state.rate_limiter.check_route(route, client_ip, account)


async def limit_request(state: AppState, ctx: RequestContext) -> None:
    """Work without a model (a batch created, a file uploaded) counts against the caller's
    requests-per-minute limits: 429 when they are used up."""
    if state.rate_limiter is not None:
        await state.rate_limiter.admit_request(ctx)
