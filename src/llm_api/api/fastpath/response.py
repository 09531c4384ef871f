"""`StreamResponse`: Starlette's StreamingResponse with fewer sends and no anyio task group.

- A `FinalFrame` (the stream's last bytes, `data: [DONE]` included) goes out together with the end
  of the body: one `send`, one socket write fewer per stream.
- The head is sent with the first frame, so that the server writes both at once
  (fastpath/http.py).
- The race between the body and the client's disconnect runs on plain asyncio, watched only once
  a stream lasts past WATCH_AFTER.

With `LLM_API_FAST_PATH=false` it is Starlette's StreamingResponse, unchanged (a `FinalFrame` is
plain bytes to it): same bytes on the wire, in more sends.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_api.api.fastpath.switch import enabled


class FinalFrame(bytes):
    """The last bytes of a stream: `StreamResponse` sends them with the end of the body (one
    write, not two). Plain bytes to anything else."""


# A stream still running after this long gets a task that watches for the client leaving.
WATCH_AFTER = 0.1


class StreamResponse(StreamingResponse):
    """Starlette's StreamingResponse, except that a `FinalFrame` goes out together with the end
    of the body: one `send` (one socket write) fewer per stream; and the race between the body
    and the client's disconnect runs on plain asyncio, watched only once a stream lasts."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not enabled(scope.get("app")):
            await super().__call__(scope, receive, send)
            return
        # Starlette races the two in an anyio task group (backend detection, cancel scopes,
        # a task for the body: ~5% of a proxied stream's CPU). Here the body runs in this task
        # and one small task waits for `http.disconnect`, then cancels it, as Starlette would.
        # That task starts after WATCH_AFTER: most proxied streams are over by then and never
        # need one (it was ~2% of their CPU), and a client that leaves sooner is noticed then,
        # a few tokens later at most.
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        gone = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            me.cancel()

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch())

        timer = loop.call_later(WATCH_AFTER, start_watching)
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            # Ours alone: the client left, the response is over. Anyone else's (shutdown, the
            # drain cut) goes on up.
            if not gone or me.uncancel() > 0:
                raise
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Send) -> None:
        # Not Starlette's `stream_response` overridden: with the fast path off, Starlette's runs.
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        # The head is sent when the first frame is ready, right before it, so that the server
        # can write both at once (fastpath/http.py). The service only returns a stream once
        # its first chunk is there, so this does not hold the head back.
        started = False
        # Closed here rather than by the garbage collector: we stop at a FinalFrame, before the
        # generator has returned, and asyncio would close it later with a task of its own.
        async with aclosing(self.body_iterator) as body:  # type: ignore[type-var]
            async for chunk in body:
                assert isinstance(chunk, bytes)
                if not started:
                    started = True
                    await send(start)
                if isinstance(chunk, FinalFrame):
                    end = {"type": "http.response.body", "body": bytes(chunk), "more_body": False}
                    await send(end)
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if not started:
            await send(start)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
