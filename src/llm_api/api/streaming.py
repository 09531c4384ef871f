"""Turning chunk iterators into HTTP streams: SSE for the OpenAI routes, NDJSON for /v1/stream.

The items are each chunk's JSON (bytes, from the serving modules' encoders) or a typed model.
One wrapper per format: it frames each chunk, sends keep-alive comments while the model is
quiet (so proxies do not cut idle streams), turns an exception into an error frame, and ends an
SSE stream with `data: [DONE]` (`sse_frames`; the Responses and Messages families' named events,
framed by their encoders, go through `event_frames` and end without it).
JSON encoding escapes newlines and carriage returns, so model
output such as "\\n\\ndata: [DONE]\\n\\n" stays inside a string and cannot end the stream.

The response class is api/fastpath's `StreamResponse` (Starlette's StreamingResponse when the fast
path is off). Cancellation: either races the body against `http.disconnect` and cancels it, which
closes these generators and so the backend's generation.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import orjson
import structlog
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llm_api.api.fastpath.response import FinalFrame, StreamResponse
from llm_api.core.exceptions import APIError, ServerError

log = structlog.get_logger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()
_KEEPALIVE = object()
# Between the source and the socket, the pump stops once this many frames, or this many bytes,
# wait to be written (they join into one write). The byte bound is what holds memory: one frame
# can carry a whole upstream read (up to openai_upstream.MAX_READ_BYTES), so a slow client
# holds at most about _MAX_BYTES plus one frame here, whatever it streams.
_BATCH = 64
_MAX_BYTES = 64 * 1024


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def _batches(
    items: AsyncIterator[Any], interval: float, frame: Callable[[Any], bytes]
) -> AsyncGenerator[tuple[list[bytes], bool], None]:
    """Yield `(batch, last)`: the frames (`frame(item)`) of every item the source produced since
    the previous batch, or an empty batch (a keep-alive) when `interval` passes without any;
    `last` once it has ended.

    Why a hand-over and one task per stream: the keep-alive needs the next item to be awaited
    without cancelling it on a timeout (cancelling would tear down the generator chain), which
    used to cost a task per item (`asyncio.wait` on `ensure_future(anext(...))`). Here one
    pump task drives the source for the whole stream, and a timer adds a keep-alive marker
    when `interval` has passed since the last batch: nothing is ever cancelled mid-item, so no
    item is lost. And the hand-over shows what is ready *now*: items that arrived together (an
    upstream that sends several chunks per TCP read) leave in one write instead of one socket
    write each — no buffering, nothing waits for a later item. The bound keeps backpressure: a
    slow client stops the pump, and so the upstream read, after `_MAX_BYTES` (or `_BATCH`
    frames). The pump frames each item as it is made, so its size is known at no extra cost and
    the item itself (text and JSON) is dropped at once.
    """
    # The hand-over is a deque and two futures rather than an asyncio.Queue: one producer, one
    # consumer that takes everything at once, so the queue's general machinery (getter and putter
    # lists, task accounting, an Event) was most of the pump's cost (~2% of a proxied stream's
    # instructions). tests/test_streaming.py checks batching, backpressure and closing.
    ready: deque[Any] = deque()
    loop = asyncio.get_running_loop()
    waiting: asyncio.Future[None] | None = None  # the consumer, on an empty deque
    paused: asyncio.Future[None] | None = None  # the pump, on a full one
    size = 0  # bytes of the frames in the deque
    last = loop.time()  # when the previous batch (or keep-alive) left

    def put(item: Any) -> None:
        nonlocal waiting
        ready.append(item)
        if waiting is not None:
            if not waiting.done():
                waiting.set_result(None)
            waiting = None

    async def pump() -> None:
        nonlocal paused, size
        try:
            async for item in items:
                data = frame(item)
                size += len(data)
                put(data)
                # Backpressure: wait for the consumer to take them.
                if size >= _MAX_BYTES or len(ready) >= _BATCH:
                    paused = loop.create_future()
                    await paused
        except Exception as exc:  # handed over and raised in the consumer, in order
            put(_Failed(exc))
            return
        finally:
            await items.aclose()  # type: ignore[attr-defined]
        put(_END)

    timer: asyncio.TimerHandle

    def keepalive() -> None:
        # One timer per stream, moved on as batches leave, rather than a timeout around every
        # wait: most streams end before it ever fires. It only adds a marker to an empty deque
        # (the consumer is waiting); a deque with items in it is news enough.
        nonlocal timer
        due = last + interval
        if loop.time() >= due:
            if not ready:
                put(_KEEPALIVE)
            due = loop.time() + interval
        timer = loop.call_at(due, keepalive)

    task = loop.create_task(pump())
    timer = loop.call_at(last + interval, keepalive)
    try:
        while True:
            while not ready:
                waiting = loop.create_future()
                await waiting
            batch = list(ready)
            ready.clear()
            size = 0
            if paused is not None:
                if not paused.done():
                    paused.set_result(None)
                paused = None
            last = loop.time()
            if batch[0] is _KEEPALIVE:  # only ever put into an empty deque: first if at all
                del batch[0]
                if not batch:
                    yield [], False
                    continue
            tail = batch[-1]
            if tail is _END:
                yield batch[:-1], True
                return
            if isinstance(tail, _Failed):
                if len(batch) > 1:
                    yield batch[:-1], False
                raise tail.exc
            yield batch, False
    finally:
        timer.cancel()
        # Client gone or drain cut: cancellation reaches the backend (stops generating).
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # ours, not just the pump's: it goes on up


def error_payload(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIError):
        return exc.to_dict()
    log.error("stream_failed", exc_info=exc)
    return ServerError("The server had an error while generating the response.").to_dict()


Chunk = bytes | BaseModel  # a chunk's JSON, or a model to serialise


def _sse_event(chunk: Chunk) -> bytes:
    body = chunk if isinstance(chunk, bytes) else chunk.model_dump_json().encode()
    return b"data: " + body + b"\n\n"


def _ndjson_line(chunk: Chunk) -> bytes:
    body = chunk if isinstance(chunk, bytes) else chunk.model_dump_json().encode()
    return body + b"\n"


KEEPALIVE_COMMENT = b": keep-alive\n\n"


async def sse_frames(chunks: AsyncIterator[Chunk], keepalive: float) -> AsyncIterator[bytes]:
    """Chat and completions: `data:` events, keep-alive comments, `data: [DONE]` at the end."""
    done = b"data: [DONE]\n\n"
    try:
        async with aclosing(_batches(chunks, keepalive, _sse_event)) as batches:
            async for batch, last in batches:
                if not batch and not last:
                    yield KEEPALIVE_COMMENT
                    continue
                frames = b"".join(batch)
                if last:
                    yield FinalFrame(frames + done)
                    return
                yield frames
    except Exception as exc:  # after the first byte, errors travel in-band
        yield _error_data(exc)
    yield FinalFrame(done)


async def ndjson_lines(chunks: AsyncIterator[Chunk], keepalive: float) -> AsyncIterator[bytes]:
    try:
        async with aclosing(_batches(chunks, keepalive, _ndjson_line)) as batches:
            async for batch, last in batches:
                if not batch and not last:
                    yield b"\n"  # blank lines are skipped by NDJSON readers
                elif batch:
                    lines = b"".join(batch)
                    yield FinalFrame(lines) if last else lines
    except Exception as exc:
        yield FinalFrame(orjson.dumps(error_payload(exc)) + b"\n")


def _error_data(exc: Exception) -> bytes:
    return b"data: " + orjson.dumps(error_payload(exc)) + b"\n\n"


async def event_frames(
    events: AsyncIterator[bytes],
    keepalive: float,
    ping: bytes = KEEPALIVE_COMMENT,
    on_error: Callable[[Exception], bytes] = _error_data,
) -> AsyncIterator[bytes]:
    """Named SSE events already framed by the caller (`event: ...\ndata: ...\n\n`: the
    Responses and Messages families): `ping` when quiet (a keep-alive comment unless given),
    `on_error(exc)` for an error after the first byte (a `data:` error object unless given),
    and no `data: [DONE]`, as OpenAI's and Anthropic's streams end."""
    try:
        async with aclosing(_batches(events, keepalive, _as_is)) as batches:
            async for batch, last in batches:
                if not batch and not last:
                    yield ping
                    continue
                if last:
                    yield FinalFrame(b"".join(batch))
                    return
                yield b"".join(batch)
    except Exception as exc:
        yield FinalFrame(on_error(exc))


def _as_is(frame: bytes) -> bytes:
    return frame


def sse_response(chunks: AsyncIterator[Chunk], keepalive: float) -> StreamingResponse:
    return StreamResponse(
        sse_frames(chunks, keepalive), media_type="text/event-stream", headers=SSE_HEADERS
    )


def named_sse_response(
    events: AsyncIterator[bytes],
    keepalive: float,
    ping: bytes = KEEPALIVE_COMMENT,
    on_error: Callable[[Exception], bytes] = _error_data,
) -> StreamingResponse:
    """A stream of named events (`event_frames`)."""
    return StreamResponse(
        event_frames(events, keepalive, ping, on_error),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def ndjson_response(chunks: AsyncIterator[Chunk], keepalive: float) -> StreamingResponse:
    return StreamResponse(
        ndjson_lines(chunks, keepalive),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache"},
    )
