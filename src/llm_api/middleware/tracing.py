"""The request span: one SERVER span per HTTP request, ended when the response has ended.

Installed only when tracing is on (services/tracing.py; main.create_app), so it costs nothing
otherwise. It continues the client's W3C `traceparent`, keeps the span's context in the scope
state for api/deps (`RequestContext.trace`, the parent of the pipeline's spans) and
api/security (the authentication span), and ends the span after the app returned: for a stream
after its last frame, after the pipeline's own spans ended, including a client that went away
(`llm_api.client_cancelled`) or the drain's cut at shutdown (`llm_api.drain_cut`).

Attributes: the HTTP semantic conventions' method, route template (never the raw path, as the
access log), status; the request id; and from the pipeline's `Outcome` (what the completion
routes hand the access log) the answering model, token counts, TTFT and cache status.
"""

from __future__ import annotations

from typing import Any

from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.middleware.access_log import OUTCOME_KEY
from llm_api.services import tracing
from llm_api.services.tracing import SpanKind

# Probes and scrapes every few seconds would drown the traces (the access log skips them too).
_PROBES = frozenset({"/health", "/ready", "/metrics"})


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Route object → its template with the routers' prefixes (as middleware/access_log.py:
        # finding it walks the routes, so once per route).
        self._templates: dict[int, tuple[Any, str | None]] = {}

    def _template(self, scope: Scope) -> str | None:
        route = scope.get("route")
        if route is None:
            return None
        known = self._templates.get(id(route))
        if known is None or known[0] is not route:
            known = (route, get_route_name(HTTPConnection(scope), should_include_root_path=False))
            self._templates[id(route)] = known
        return known[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or tracing.TRACER is None or scope["path"] in _PROBES:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parent = tracing.extract_asgi(scope["headers"])
        span = tracing.start(
            method,
            parent,
            SpanKind.SERVER,
            {"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
        )
        state = scope.setdefault("state", {})
        state[tracing.SCOPE_KEY] = tracing.context_of(span, parent)
        status: int | None = None
        ended = disconnected = False

        async def traced_send(message: Message) -> None:
            nonlocal status, ended
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        async def traced_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            await self.app(scope, traced_receive, traced_send)
        except BaseException as exc:
            if status is None:
                status = 500
            tracing.fail(span, exc)
            raise
        finally:
            _finish(span, scope, self._template(scope), state, status, ended, disconnected)


def _finish(
    span: tracing.Span,
    scope: Scope,
    template: str | None,
    state: dict[str, Any],
    status: int | None,
    ended: bool,
    disconnected: bool,
) -> None:
    if template:
        span.update_name(f"{scope['method']} {template}")
        span.set_attribute("http.route", template)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(tracing.Status(tracing.StatusCode.ERROR, str(status)))
    request_id = state.get("request_id")
    if request_id:
        span.set_attribute("llm_api.request_id", request_id)
    if state.get("drain_cut"):
        tracing.end_cancelled(span, drain_cut=True)
    elif disconnected and not ended:
        tracing.end_cancelled(span, drain_cut=False)
    outcome = state.get(OUTCOME_KEY)
    if outcome is not None:
        span.set_attribute("gen_ai.response.model", outcome.model)
        span.set_attribute("gen_ai.usage.input_tokens", outcome.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", outcome.completion_tokens)
        span.set_attribute("llm_api.cache", outcome.cache)
        if outcome.ttft_ms is not None:
            span.set_attribute("llm_api.ttft_ms", outcome.ttft_ms)
    span.end()
