"""Refuse request bodies over a size limit before they are parsed (pure ASGI: streaming
responses pass through untouched)."""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.api.errors import ANTHROPIC_PREFIX, anthropic_error
from llm_api.core.exceptions import PayloadTooLargeError


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body exceeds the limit of {limit} bytes.")


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        # Routes whose bodies are files (batch input uploads) have their own, larger limit.
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.per_path.get(scope["path"], self.default_max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > max_bytes
                except ValueError:
                    too_big = True
                if too_big:  # refuse at once, without reading the body
                    await _reject(send, max_bytes, scope["path"])
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:  # chunked bodies have no content-length
                    raise BodyTooLarge(max_bytes)
            return message

        await self.app(scope, limited_receive, send)


async def _reject(send: Send, limit: int, path: str) -> None:
    error = PayloadTooLargeError(f"Request body exceeds the limit of {limit} bytes.")
    # In the family's shape: Anthropic's under /v1/messages (api/errors.py).
    shaped = anthropic_error(error)[1] if path.startswith(ANTHROPIC_PREFIX) else error.to_dict()
    body = orjson.dumps(shaped)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
