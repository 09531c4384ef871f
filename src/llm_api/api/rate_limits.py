"""Rate limits of routes without a model (login, key creation, batches and files), called from
their endpoints. Completions are limited inside the LLM service (services/rate_limit), before
tokenization."""

from __future__ import annotations

from typing import Literal

from fastapi import Request, Response

from llm_api.core.state import AppState
from llm_api.services.llm.types import RequestContext
from llm_api.services.rate_limit.login import LoginThrottle


async def limit_route(
    request: Request, route: Literal["key_creation"], account: str | None
) -> None:
    """429 when this client IP or this account has used up the route's limit."""
    state: AppState = request.app.state.llm_api
    client_ip = request.client.host if request.client else None
    await state.rate_limiter.check_route(route, client_ip, account)


def _login_throttle(request: Request) -> LoginThrottle | None:
    state: AppState = request.app.state.llm_api
    limiter = state.rate_limiter
    if not limiter.enabled:
        return None
    return limiter.login


async def check_login(request: Request, username: str) -> None:
    """Count a login attempt before the password is hashed; 429 while this (account, client)
    pair or this client must wait (services/rate_limit/login.py)."""
    throttle = _login_throttle(request)
    if throttle is not None:
        await throttle.check(username, request.client.host if request.client else None)


async def login_succeeded(request: Request, username: str) -> None:
    throttle = _login_throttle(request)
    if throttle is not None:
        await throttle.succeeded(username, request.client.host if request.client else None)


async def limit_request(state: AppState, ctx: RequestContext, response: Response) -> None:
    """Work without a model (a batch created, a file uploaded) counts against the caller's
    requests-per-minute limits: 429 when they are used up; the x-ratelimit-* headers go on
    `response`."""
    if state.rate_limiter is not None:
        response.headers.update(await state.rate_limiter.admit_request(ctx))
