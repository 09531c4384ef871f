"""Deny by default: walk every route of the real app without credentials (and with junk ones);
everything answers 401 except this explicit allowlist."""

from __future__ import annotations

import re
from typing import Any

import httpx
from starlette.routing import Mount

# Public on purpose: probes, the OpenAPI docs, login/refresh, and the static web UI shell (it
# holds no data; its pages call the API with the user's own credentials).
PUBLIC = {
    "/health",
    "/ready",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/v1/auth/token",
    "/v1/auth/refresh",
    # Single sign-on (404 while it is not configured): the sign-in page's button, the redirect
    # to the provider, its redirect back, and the web UI collecting that login.
    "/v1/auth/oidc",
    "/v1/auth/oidc/login",
    "/v1/auth/oidc/callback",
    "/v1/auth/oidc/session",
    "/",
}
PUBLIC_MOUNTS = {"/ui"}


def _routes(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route, including those of included routers."""
    found: list[tuple[str, str]] = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path + "/{file}"))
            continue
        contexts = (
            list(route.effective_route_contexts())  # FastAPI >= 0.13x: included routers
            if hasattr(route, "effective_route_contexts")
            else [route]
        )
        for ctx in contexts:
            for method in sorted(getattr(ctx, "methods", None) or {"GET"}):
                if method != "HEAD":
                    found.append((method, ctx.path))
    return found


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-id", path)


async def test_every_route_but_the_allowlist_needs_credentials(app: Any) -> None:
    routes = _routes(app)
    paths = {p for _, p in routes}
    assert "/v1/chat/completions" in paths and "/v1/admin/users" in paths  # the walk sees all
    assert len(routes) > 20
    transport = httpx.ASGITransport(app=app)
    wrong: list[tuple[str, str, int]] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as anon:
        for method, template in routes:
            public = template in PUBLIC or any(template.startswith(m + "/") for m in PUBLIC_MOUNTS)
            url = _concrete(template)
            for headers in ({}, {"Authorization": "Bearer sk-llmapi-not-a-real-key"}):
                r = await anon.request(method, url, headers=headers, json={})
                if public:
                    if r.status_code == 401:
                        wrong.append((method, template, r.status_code))
                elif r.status_code != 401 or r.json()["error"]["type"] != "authentication_error":
                    wrong.append((method, template, r.status_code))
    assert not wrong, wrong


async def test_allowlist_is_exactly_what_the_app_exposes(app: Any) -> None:
    # A new public route must be added here on purpose; a removed one must leave the list.
    templates = {p for _, p in _routes(app)}
    assert templates >= PUBLIC
