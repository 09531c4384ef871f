"""Graceful drain on SIGTERM.

uvicorn reacts to SIGTERM by closing its listening socket at once and then waiting for open
connections (forever unless `timeout_graceful_shutdown` is set, which `fastapi run` and gunicorn's
worker do not set). That gives a load balancer no chance to see readiness fail and gives clients
"connection refused" instead of a clean 503. So we put our own handler in front of uvicorn's:

1. the signal sets `AppState.draining` at once: /ready answers 503, new /v1 requests get 503 +
   Retry-After (middleware/drain.py) while the socket still accepts;
2. in-flight /v1 requests may finish for up to `LLM_API_DRAIN_TIMEOUT` seconds; then they are
   cut: streams end with an SSE error event and `data: [DONE]`, unstarted responses get 503;
3. the `AppState.on_drain` hooks run (the usage recorder flushes its buffer there);
4. uvicorn's own handler is called, so it closes the socket, runs the lifespan shutdown and exits.

A second SIGTERM skips the wait and goes straight to step 4.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Protocol

import structlog

from llm_api.core import metrics

log = structlog.get_logger(__name__)

DrainHook = Callable[[], Awaitable[None]]
_CUT_GRACE = 5.0  # seconds cut requests get to send their final frame and unwind
_HOOK_TIMEOUT = 10.0  # per on_drain hook


class _Flag(Protocol):
    draining: bool


class Drainer:
    """Lives on AppState as `state.drainer`; `state.draining` is the flag it raises."""

    def __init__(
        self,
        flag: _Flag,
        timeout: float,
        hooks: list[DrainHook],
        cutting: asyncio.Event | None = None,
    ) -> None:
        self.flag = flag
        self.timeout = timeout
        self.hooks = hooks
        # Set when the drain timeout passed and in-flight work is being cancelled. Shared with
        # the LLM service, which then records a cancellation as the server's cut (503), not as
        # a client that left (499).
        self.cutting = cutting or asyncio.Event()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.cut_tasks: set[asyncio.Task[Any]] = set()  # the ones cancelled by the cut
        self._hooks_done = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    @property
    def draining(self) -> bool:
        return self.flag.draining

    # --- signal wiring --------------------------------------------------------------------------

    def install(self) -> None:
        """Put our SIGTERM handler in front of the current one (uvicorn's). Only possible on the
        main thread; elsewhere (tests driving the app in-process) drain is started by `begin()`."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        if self._loop is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._loop = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.draining:  # second SIGTERM: stop waiting
            self._chain(signum, frame)
            return
        self.flag.draining = True  # before anything else: /ready turns 503 now
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start, signum)

    def _start(self, signum: int) -> None:
        self._task = asyncio.ensure_future(self._drain_then_exit(signum))

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    # --- the drain itself -----------------------------------------------------------------------

    def begin(self) -> None:
        """Refuse new work without a signal (tests, or an admin action)."""
        self.flag.draining = True

    async def _drain_then_exit(self, signum: int) -> None:
        try:
            await self.drain()
        finally:
            self._chain(signum, None)

    async def drain(self) -> None:
        """Wait for in-flight work up to the timeout, cut what is left, run the hooks."""
        self.flag.draining = True
        metrics.DRAINING.set(1)
        loop = asyncio.get_running_loop()
        log.info("drain_started", inflight=len(self.inflight), timeout_s=self.timeout)
        deadline = loop.time() + self.timeout
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            self.cutting.set()
            log.warning("drain_timeout_cutting", inflight=len(self.inflight))
            for task in list(self.inflight):
                self.cut_tasks.add(task)
                task.cancel("drain timeout")
            grace = loop.time() + _CUT_GRACE
            while self.inflight and loop.time() < grace:
                await asyncio.sleep(0.05)
        await self.run_hooks()
        log.info("drain_finished", cut=self.cut)

    @property
    def cut(self) -> bool:
        return self.cutting.is_set()

    async def run_hooks(self) -> None:
        """Run every on_drain hook once (also called from the lifespan's shutdown)."""
        if self._hooks_done:
            return
        self._hooks_done = True
        for hook in self.hooks:
            try:
                await asyncio.wait_for(hook(), _HOOK_TIMEOUT)
            except Exception:
                log.exception("drain_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))
