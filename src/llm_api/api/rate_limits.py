"""Rate limits of routes without a model (login, key creation), called from their endpoints.
Completions are limited inside the LLM service (services/rate_limit), before tokenization."""

from __future__ import annotations

from typing import Literal

from fastapi import Request

from llm_api.core.state import AppState


async def limit_route(
    request: Request, route: Literal["login", "key_creation"], account: str | None
) -> None:
    """429 when this client IP or this account has used up the route's limit."""
    state: AppState = request.app.state.llm_api
    if state.rate_limiter is None:
        return
    client_ip = request.client.host if request.client else None
    await state.rate_limiter.check_route(route, client_ip, account)
