"""Cancel a non-streaming request when its client goes away, so the model stops generating
for nobody. (Streaming responses get this from Starlette's StreamingResponse.)"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, racing it against the ASGI `http.disconnect` message. Polling
    `request.is_disconnected()` would miss the message; waiting on `receive` cannot.

    Plain asyncio tasks rather than an anyio task group: a task group wraps the work's own
    errors (a 400 `InvalidRequestError`) in an ExceptionGroup, which no handler would match."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancel whichever is still running and wait for it, so the backend has stopped (and
        # the model is free) before the request ends, even when we were cancelled ourselves.
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()
