"""Turning chunk iterators into HTTP streams: SSE for the OpenAI routes, NDJSON for /v1/stream.

One wrapper per format: it frames each typed chunk, sends keep-alive comments while the model is
quiet (so proxies do not cut idle streams), turns an exception into an error frame, and ends an
SSE stream with `data: [DONE]`. JSON encoding escapes newlines and carriage returns, so model
output such as "\\n\\ndata: [DONE]\\n\\n" stays inside a string and cannot end the stream.

Cancellation: under uvicorn (ASGI spec 2.3) Starlette's StreamingResponse races the body against
`http.disconnect` and cancels it, which closes these generators and so the backend's generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llm_api.core.exceptions import APIError, ServerError

log = structlog.get_logger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_KEEPALIVE = object()
_END = object()


async def _with_keepalive(items: AsyncIterator[Any], interval: float) -> AsyncIterator[Any]:
    """Yield items; yield _KEEPALIVE whenever `interval` passes without one. The pending
    `anext` is kept across timeouts (never cancelled), so no item is lost."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items, _END))
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield _KEEPALIVE
                continue
            item, pending = pending.result(), None
            if item is _END:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await items.aclose()  # type: ignore[attr-defined]


def error_payload(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIError):
        return exc.to_dict()
    log.error("stream_failed", exc_info=exc)
    return ServerError("The server had an error while generating the response.").to_dict()


async def sse_frames(chunks: AsyncIterator[BaseModel], keepalive: float) -> AsyncIterator[bytes]:
    try:
        async for chunk in _with_keepalive(chunks, keepalive):
            if chunk is _KEEPALIVE:
                yield b": keep-alive\n\n"
            else:
                yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
    except Exception as exc:  # after the first byte, errors travel in-band
        yield b"data: " + orjson.dumps(error_payload(exc)) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def ndjson_lines(chunks: AsyncIterator[BaseModel], keepalive: float) -> AsyncIterator[bytes]:
    try:
        async for chunk in _with_keepalive(chunks, keepalive):
            if chunk is _KEEPALIVE:
                yield b"\n"  # blank lines are skipped by NDJSON readers
            else:
                yield chunk.model_dump_json().encode() + b"\n"
    except Exception as exc:
        yield orjson.dumps(error_payload(exc)) + b"\n"


def sse_response(chunks: AsyncIterator[BaseModel], keepalive: float) -> StreamingResponse:
    return StreamingResponse(
        sse_frames(chunks, keepalive), media_type="text/event-stream", headers=SSE_HEADERS
    )


def ndjson_response(chunks: AsyncIterator[BaseModel], keepalive: float) -> StreamingResponse:
    return StreamingResponse(
        ndjson_lines(chunks, keepalive),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache"},
    )
