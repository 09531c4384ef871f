""" "First frame, then the rest": the one helper every layer uses to start a stream.

Awaiting the first item before anything is sent lets errors raised before it (validation,
admission, an upstream's 5xx) surface as plain HTTP errors, or let a fallback model try; the
returned iterator then yields that item and the rest, and closes the source whatever happens
(finished, failed, or closed early by a client that went away).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TypeVar

T = TypeVar("T")


async def first_then_rest(source: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Start `source`: raises what it raises before its first item (after closing it)."""
    try:
        first = await anext(source)
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await source.aclose()
        raise
    return _resumed(first, source)


async def _resumed(first: T, source: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    try:
        yield first
        async for item in source:
            yield item
    finally:
        await source.aclose()


async def _empty() -> AsyncGenerator[T, None]:
    return
    yield
