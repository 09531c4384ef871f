"""Per-model admission: at most `slots` requests generate at once, at most `max_waiting` wait in
FIFO order, and anyone beyond that is refused at once with 503.

Hand-written because asyncio.Semaphore has no bound on its waiters and cannot refuse; the
refusal must be immediate so an overloaded server sheds load instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llm_api.core.exceptions import OverloadedError


class AdmissionGate:
    def __init__(self, name: str, slots: int, max_waiting: int) -> None:
        self.name = name
        self.slots = slots
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise OverloadedError(
                f"Model `{self.name}` is at capacity; retry shortly.", retry_after=1
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over by resolving this future
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release_slot()  # we were handed a slot but are leaving: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self._release_slot()

    def _release_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # slot passes directly to the oldest waiter
                return
        self.running -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
