"""Which API key scope each /v1 route needs: declared on the endpoint, checked by `authenticate`.

Deny by default: an API key is refused (403) on a route that declares no scope, so a route
added without thought is closed to keys, and tests/auth/test_scopes.py walks every /v1 route to
check that each one declares a scope (or is @public). Checked by endpoint function, as @public
is, inside the router's `authenticate` dependency: no extra dependency per request.

Only API keys are checked here. A password login (JWT) holds every scope its role allows, and
the role checks (`get_admin`) still apply to everyone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from llm_api.core.exceptions import PermissionDeniedError
from llm_api.services.auth.principal import Principal
from llm_api.services.auth.scopes import Scope

F = TypeVar("F", bound=Callable[..., Any])

_ROUTE_SCOPES: dict[Callable[..., Any], Scope] = {}


def requires_scope(scope: Scope) -> Callable[[F], F]:
    """Declare the scope an API key needs for this endpoint (put it under `@router.get`...)."""

    def declare(endpoint: F) -> F:
        _ROUTE_SCOPES[endpoint] = scope
        return endpoint

    return declare


def required_scope(endpoint: Callable[..., Any] | None) -> Scope | None:
    return _ROUTE_SCOPES.get(endpoint) if endpoint is not None else None


def check_scope(request: Request, principal: Principal) -> None:
    """403 when an API key lacks the scope of the route it called, or the route declares none."""
    if principal.method != "api_key":
        return
    needed = _ROUTE_SCOPES.get(request.scope.get("endpoint"))  # type: ignore[arg-type]
    if needed is None:
        raise PermissionDeniedError(
            "This route declares no API key scope, so API keys may not call it; "
            "sign in with a password instead.",
            code="missing_scope",
        )
    if needed not in principal.scopes:
        raise PermissionDeniedError(
            f"You have insufficient permissions for this operation. Missing scope: {needed}. "
            f"Use a key created with the '{needed}' scope (POST /v1/keys with \"scopes\", or "
            f"`llm-api keys create EMAIL --scope {needed}`), or sign in with a password.",
            code="missing_scope",
        )
