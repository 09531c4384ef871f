"""How late this process's event loop runs (loop lag), so that a Redis call that ran out of time
while the loop itself was stalled is not taken for a slow Redis.

When the loop is starved of CPU (a neighbour process, a burst of CPU-bound work in callbacks),
a reply that arrived in time sits unread in the socket; when the loop runs again, the call's
timer fires before the task that would read the reply (asyncio runs due timers before the
wake-ups they race with). Judged by that timer alone, a healthy Redis looks down.

`LoopLag` is a task that sleeps INTERVAL_S at a time and records how late it woke, the event
loop delay that Node's `perf_hooks.monitorEventLoopDelay` samples with a timer the same way. One
wake-up per 50 ms costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import collections


class LoopLag:
    INTERVAL_S = 0.05

    def __init__(self) -> None:
        # (loop time of the wake-up, how late it was), the last few seconds' worth.
        self._ticks: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start measuring on the running loop (again, when it is another loop than before)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._due = loop.time() + self.INTERVAL_S
            self._task = loop.create_task(self._run(), name="redis-loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Also on the first run: a task started in the middle of a burst first runs when
            # the burst's callbacks have, which is lag too.
            now = loop.time()
            self._ticks.append((now, max(0.0, now - self._due)))
            self._due = now + self.INTERVAL_S
            await asyncio.sleep(self.INTERVAL_S)

    def since(self, start: float) -> float:
        """The longest the loop was late (seconds) since loop time `start`, up to now: a wake-up
        overdue at this moment counts, so does one that came late since `start`."""
        if self._task is None:
            return 0.0
        now = asyncio.get_running_loop().time()
        worst = max(0.0, now - self._due)
        for at, lag in reversed(self._ticks):
            if at < start:
                break
            worst = max(worst, lag)
        return worst

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
