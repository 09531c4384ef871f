"""Refuses new /v1 work while draining and cuts in-flight work at the drain deadline.

`state.drainer` keeps each /v1 request's task (the server's task for the request; no task of our
own, which would cost every request its creation and scheduling) and cancels it when the drain
timeout passes (core/drain.py). This middleware catches that cancellation, tells it from any
other (the task is in `drainer.cut_tasks` and nothing else cancelled it), and finishes the
response itself: a stream that has begun gets an in-band error frame (and `data: [DONE]` for
SSE), a response that has not begun gets 503 + Retry-After. Frames are whole
`http.response.body` messages, so the error frame never lands inside another frame.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_api.core.exceptions import ServiceUnavailableError

RETRY_AFTER = "5"


def _error(message: str) -> dict[str, Any]:
    return ServiceUnavailableError(message).to_dict()


class _Watch:
    """Remembers what has been sent, so a cut response can be finished correctly."""

    __slots__ = ("send", "started", "ended", "content_type")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.ended = False
        self.content_type = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            for key, value in message.get("headers", ()):
                if key.lower() == b"content-type":
                    self.content_type = value
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        await self.send(message)

    async def finish_cut(self) -> None:
        if self.ended:
            return
        if not self.started:
            await refuse(self.send, "The server is shutting down; retry the request.")
            return
        body = orjson.dumps(_error("The server is shutting down; the response was cut off."))
        if self.content_type.startswith(b"text/event-stream"):
            frame = b"data: " + body + b"\n\ndata: [DONE]\n\n"
        elif self.content_type.startswith(b"application/x-ndjson"):
            frame = body + b"\n"
        else:
            frame = b""  # a plain body cannot carry an error once begun; end it
        await self.send({"type": "http.response.body", "body": frame, "more_body": False})
        self.ended = True


async def refuse(send: Send, message: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"retry-after", RETRY_AFTER.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": orjson.dumps(_error(message))})


class DrainMiddleware:
    def __init__(self, app: ASGIApp, prefix: str = "/v1") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope["app"].state, "llm_api", None) if "app" in scope else None
        if scope["type"] != "http" or state is None or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        drainer = state.drainer
        if drainer.draining:
            await refuse(send, "The server is shutting down; retry the request.")
            return
        watch = _Watch(send)
        task = asyncio.current_task()
        assert task is not None
        drainer.inflight.add(task)
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            # The drain cut alone (one cancellation, ours): finish the response. Anything else
            # (server shutdown, a second cancellation) goes on up.
            if not (task in drainer.cut_tasks and task.cancelling() == 1):
                raise
            task.uncancel()
            scope.setdefault("state", {})["drain_cut"] = True
            await watch.finish_cut()
        finally:
            drainer.inflight.discard(task)
            drainer.cut_tasks.discard(task)
