"""Authentication as a router-level dependency: deny by default.

`authenticate` runs on every route of the /v1 router (see api/v1/router.py), so a new route is
protected without opting in. Only endpoints marked @public skip it; /health, /ready and the
OpenAPI docs live outside /v1. A failing verifier or database is a 401 or 503, never anonymous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError

from llm_api.api.scopes import check_scope
from llm_api.core.config import is_loopback_host
from llm_api.core.exceptions import (
    AuthenticationError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llm_api.core.state import AppState
from llm_api.services import tracing
from llm_api.services.auth.key_controls import check_principal_key
from llm_api.services.auth.principal import ANONYMOUS, Principal

log = structlog.get_logger(__name__)

# The endpoints that need no credentials: login and refresh (marked with @public). Matched by
# the endpoint function the router resolved, never by the raw path, so `//v1/..` or encoded
# variants cannot reach a protected route unauthenticated. tests/auth/test_route_walk.py pins
# the exact list.
_PUBLIC_ENDPOINTS: set[Callable[..., Any]] = set()

F = TypeVar("F", bound=Callable[..., Any])


def public(endpoint: F) -> F:
    """Exempt one /v1 endpoint from authentication. Use sparingly; the route walk test lists
    every public route."""
    _PUBLIC_ENDPOINTS.add(endpoint)
    return endpoint


def is_loopback(host: str | None) -> bool:
    return host is not None and is_loopback_host(host)


def bearer_credential(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        # Anthropic's clients send the key as `x-api-key` (read only without Authorization).
        key = request.headers.get("x-api-key")
        return None if key is None else key.strip()
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer":
        return ""  # present but unusable: a 401, not "no credentials"
    return credential.strip()


# Headers that a proxy adds: a request carrying one was relayed for someone else, so its
# loopback peer (a proxy on this host) says nothing about who is calling.
_FORWARDING_HEADERS = frozenset(
    {
        b"forwarded", b"via", b"x-real-ip", b"x-client-ip", b"true-client-ip",
        b"cf-connecting-ip", b"fastly-client-ip", b"x-cluster-client-ip", b"client-ip",
        b"x-original-forwarded-for", b"x-proxyuser-ip",
    }
)  # fmt: skip


def _forwarded(request: Request) -> bool:
    return any(
        name in _FORWARDING_HEADERS or name.startswith(b"x-forwarded-")
        for name, _ in request.scope["headers"]
    )


def _loopback_host_header(request: Request) -> bool:
    """The Host names this machine: a page whose own name was re-pointed at 127.0.0.1 (DNS
    rebinding) sends its own name, so a browser cannot lend it the anonymous caller."""
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def _anonymous_allowed(request: Request) -> bool:
    """Auth-off mode serves only a direct local caller: the TCP peer and the address it
    connected to are loopback, nothing says the request was relayed, and it names this host.
    Anything else (a reverse proxy on this host, a rebinding web page) gets a 401."""
    server = request.scope.get("server")
    server_host = server[0] if server else None
    client_host = request.client.host if request.client else None
    return (
        (server_host is None or is_loopback(server_host))
        and is_loopback(client_host)
        and not _forwarded(request)
        and _loopback_host_header(request)
    )


async def authenticate(request: Request) -> Principal | None:
    """The caller, or None on a public route. Raises 401/503 otherwise."""
    if tracing.TRACER is not None:  # off: no span, nothing looked up
        return await _traced_authenticate(request)
    return await _checked_principal(request)


async def _checked_principal(request: Request) -> Principal | None:
    principal = await _authenticate(request)
    if principal is not None:
        # A key's expiry and client-IP allow-list, however it was verified (database, cache or
        # outage grace): a cached key never outlives its expiry (key_controls.py).
        check_principal_key(principal.controls, request.client.host if request.client else None)
        check_scope(request, principal)  # an API key only within its scopes (api/scopes.py)
    return principal


async def _traced_authenticate(request: Request) -> Principal | None:
    """`authenticate` in its own span: how the caller proved who they are, and how long it
    took (a database read, or the key cache). Never the credential."""
    span = tracing.start("authenticate", request.scope.get("state", {}).get(tracing.SCOPE_KEY))
    try:
        principal = await _checked_principal(request)
        if principal is not None:
            span.set_attribute("llm_api.auth.method", principal.method)
            if principal.user_id is not None:
                span.set_attribute("user.id", principal.user_id)
        return principal
    except BaseException as exc:
        tracing.fail(span, exc)
        raise
    finally:
        span.end()


async def _authenticate(request: Request) -> Principal | None:
    if request.scope.get("endpoint") in _PUBLIC_ENDPOINTS:
        return None
    state: AppState = request.app.state.llm_api
    credential = bearer_credential(request)
    if credential is None and not state.settings.auth_enabled:
        if _anonymous_allowed(request):
            return ANONYMOUS
        raise AuthenticationError(
            "Credentials are required: keyless access is only for direct requests from this "
            "machine, not through a proxy."
        )
    if not credential:
        raise AuthenticationError()
    authenticator = state.auth.authenticator
    cached = authenticator.cached(credential) or authenticator.between_outage_retries(credential)
    if cached is not None:  # a recently verified API key: no database session at all
        return cached
    try:
        async with state.db.sessions() as db:
            return await authenticator.authenticate(db, credential)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # A key verified within the outage grace period keeps working (key_cache.py).
        fallback = authenticator.database_unreachable(credential, exc)
        if fallback is not None:
            return fallback
        raise ServiceUnavailableError(
            "Authentication is temporarily unavailable; retry shortly."
        ) from exc


async def get_principal(principal: Annotated[Principal | None, Depends(authenticate)]) -> Principal:
    if principal is None:  # only on a public route that asked for a principal anyway
        raise AuthenticationError()
    return principal


async def get_current_user(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """A signed-in user (account routes need an account; the auth-disabled anonymous caller
    has none)."""
    if principal.user_id is None:
        raise AuthenticationError("This route needs an account's credentials.")
    return principal


async def get_admin(principal: Annotated[Principal, Depends(get_current_user)]) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError("This route is for administrators.")
    return principal
