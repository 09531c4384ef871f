"""X-Request-ID: accepted from the client when well-formed, generated otherwise, stored in the
scope for handlers and logs, and echoed on the response.

A generated id is also the request's generation id (completion id, usage record; see
api/deps.py), so a user quoting the header can be found in the usage records. A client's own id
never is: usage records are idempotent by that id, and a reused one would drop the record."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.core.ids import new_request_id

_VALID = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")
GENERATED_KEY = "request_id_generated"  # scope["state"] key: the id, when we made it


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next(
            (v for k, v in scope["headers"] if k == b"x-request-id" and _VALID.match(v)), None
        )
        state = scope.setdefault("state", {})
        if rid:
            request_id = rid.decode()
        else:
            request_id = state[GENERATED_KEY] = new_request_id()
        state["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)
