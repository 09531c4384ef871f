"""Adds the headers services decided for a response (`RequestContext.response_headers`, e.g. the
`x-ratelimit-*` headers of the rate limiter) to whatever response the route returns: a JSON body,
or a stream whose headers leave before its first frame. Pure ASGI: streams pass untouched."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.middleware.access_log import CTX_KEY
from llm_api.services.llm.types import RequestContext


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # api/deps stores the RequestContext here

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx = state.get(CTX_KEY)
                if isinstance(ctx, RequestContext) and ctx.response_headers:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    extra = [
                        (name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in ctx.response_headers.items()
                        if name.lower().encode("latin-1") not in present
                    ]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
