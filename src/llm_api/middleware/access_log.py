"""One access-log line and the HTTP metrics (core/metrics.observe_http) per request, written when
the response has fully ended: for a stream that is after its last frame, so the line carries the
stream's token counts and duration. One middleware for both: they need the same status, duration
and route template, and every middleware that wraps `send` costs each frame a call.

Fields: method, path (the route template, e.g. /v1/files/{file_id}; `UNMATCHED` when no route
matched, never the raw path, which a client may have put a password or token into), status,
duration_ms, request_id (X-Request-ID, middleware/request_id.py); from the request's
RequestContext (who asked; api/deps.get_request_context keeps it in the scope state):
generation_id (the id in completion ids and usage rows), user_id; and from the pipeline's
`Outcome`, which the completion routes hand over with `log_outcome` (final by the last byte):
model, prompt_tokens, completion_tokens, ttft_ms, cache. Never the body, the query string or a
header value.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import structlog
from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.core.metrics import observe_http
from llm_api.services.llm.stages import Outcome
from llm_api.services.llm.types import RequestContext

CTX_KEY = "llm_api_ctx"  # scope["state"] key under which api/deps stores the RequestContext
OUTCOME_KEY = "llm_api_outcome"  # and the routes the pipeline's Outcome (`log_outcome`)
_SKIP = frozenset({"/health", "/ready", "/metrics"})  # probes would drown the log
_UNMEASURED = "/metrics"  # scrapes do not count themselves
UNMATCHED = "<unmatched>"  # the path field of a request no route matched

log = structlog.get_logger("llm_api.access")
_enabled = logging.getLogger("llm_api.access").isEnabledFor


def log_outcome(scope: Scope, outcome: Outcome) -> None:
    """Hand a request's outcome (model, tokens, TTFT, cache) to its access-log line."""
    scope.setdefault("state", {})[OUTCOME_KEY] = outcome


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, skip_probes: bool = True) -> None:
        self.app = app
        self.skip = _SKIP if skip_probes else frozenset()
        # Route object → its template: finding the template walks every route with regexes
        # (tens of µs per request); it depends only on the route matched, so once per route.
        self._templates: dict[int, tuple[Any, str | None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding
        response_size = 0  # its content-length header; 0 for streams, as the instrumentator

        async def send_status(message: Message) -> None:
            nonlocal status, response_size
            if message["type"] == "http.response.start":
                status = message["status"]
                response_size = _content_length(message.get("headers", ()))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            template = self._template(scope)
            if template is not None and scope["path"] != _UNMEASURED:
                observe_http(
                    scope["method"],
                    template,
                    status,
                    seconds,
                    _content_length(scope["headers"]),
                    response_size,
                )
            if scope["path"] not in self.skip:
                self._log(scope, template, status, seconds * 1000)

    def _template(self, scope: Scope) -> str | None:
        # The template with router prefixes (scope["route"].path lacks them under nested routers).
        route = scope.get("route")
        if route is None:
            return get_route_name(HTTPConnection(scope), should_include_root_path=False)
        known = self._templates.get(id(route))  # by id: routes define __eq__, not __hash__
        if known is None or known[0] is not route:
            known = (route, get_route_name(HTTPConnection(scope), should_include_root_path=False))
            self._templates[id(route)] = known
        return known[1]

    def _log(self, scope: Scope, template: str | None, status: int, duration_ms: float) -> None:
        if not _enabled(logging.INFO):  # below the level: do not build a line to drop
            return
        state: dict[str, Any] = scope.get("state") or {}
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": template or UNMATCHED,
            "status": status,
            "duration_ms": round(duration_ms, 2),
            "request_id": state.get("request_id"),
        }
        ctx = state.get(CTX_KEY)
        if isinstance(ctx, RequestContext):
            fields.update(generation_id=ctx.request_id, user_id=ctx.user_id)
        out = state.get(OUTCOME_KEY)
        if isinstance(out, Outcome):
            fields.update(
                model=out.model,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                ttft_ms=None if out.ttft_ms is None else round(out.ttft_ms, 2),
                cache=out.cache,
            )
        if state.get("drain_cut"):
            fields["drain_cut"] = True
        log.info("request", **fields)


def _content_length(headers: Any) -> int:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
