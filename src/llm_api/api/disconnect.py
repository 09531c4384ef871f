"""Cancel a non-streaming request when its client goes away, so the model stops generating
for nobody. (Streaming responses get this from Starlette's StreamingResponse.)"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from starlette.requests import ClientDisconnect

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, racing it against the ASGI `http.disconnect` message. Polling
    `request.is_disconnected()` would miss the message; waiting on `receive` cannot."""
    result: list[T] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        result.append(await work)
        tg.cancel_scope.cancel()
    if not result:
        raise ClientDisconnect()
    return result[0]
