"""Cutting the `llama_decode` in flight short for a newcomer that outranks all of its work.

Why: with every slot busy, a decode call over all running sequences takes ~80 ms on 2 cores
(16 streams, SmolLM2-135M), and a burst of a busy tenant's new prompts longer. A tenant below
its share that arrives meanwhile (`Sequence.rank`) would wait for the call to end before its
own prompt could start: on its ~60 ms time to first token alone, that wait alone is 1-2× more.

How: llama.cpp asks an abort callback after each node of the compute graph. When it says yes,
`llama_decode` returns 2 and removes from the KV cache what the aborted micro-batch had added
(the engine removes what earlier micro-batches of the same call added too), so the call can
simply run again later. The engine then evaluates the newcomer's prompt first.

When: only while the call is less than half done by the time it is expected to take (a running
average per token, for decode calls and prompt chunks apart), so what is thrown away is never
more than what the newcomer would have waited; and at most once per engine step (`arm`), so a
stream of newcomers cannot stall the running sequences: each step still ends with its decode.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import llama_cpp

# Running averages of a call's seconds per token: start values, then updated from each call.
_START_PER_TOKEN = {False: 0.005, True: 0.005}  # decode call, prompt chunk
_SMOOTHING = 0.2


class CallInterrupter:
    """Installed on one llama.cpp context; `begin`/`end` bracket each `llama_decode` on the
    engine thread, `request` comes from the event loop (any thread)."""

    def __init__(self, ctx: Any) -> None:
        self._lock = threading.Lock()
        self._abort = False  # read by llama.cpp's compute thread, through `_callback`
        self._armed = False
        self._rank: tuple[int, float] | None = None  # of the call in flight; None between calls
        self._started = 0.0
        self._expected = 0.0
        self._prefill = False
        self._tokens = 0
        self._per_token = dict(_START_PER_TOKEN)
        # Kept on self: llama.cpp holds only the pointer. Called after every graph node, on
        # llama.cpp's compute thread (measured, 16 streams over HTTP: 183-184 tok/s with it,
        # 174-175 without; no cost).
        self._callback = llama_cpp.ggml_abort_callback(lambda _data: self._poll())
        llama_cpp.llama_set_abort_callback(ctx, self._callback, ctypes.c_void_p(0))

    def _poll(self) -> bool:
        return self._abort

    @property
    def in_flight(self) -> tuple[tuple[int, float], bool] | None:
        """(rank, prompt chunk?) of the call in flight while a newcomer may cut it short."""
        rank = self._rank
        return None if rank is None else (rank, self._prefill)

    def arm(self) -> None:
        """A new engine step: one of its calls may be cut short."""
        self._armed = True

    def begin(self, rank: tuple[int, float], tokens: int, prefill: bool) -> None:
        with self._lock:
            self._abort = False
            self._rank = rank if self._armed else None
            self._prefill, self._tokens = prefill, tokens
            self._expected = self._per_token[prefill] * tokens
            self._started = time.monotonic()

    def end(self, rc: int) -> bool:
        """After the call (llama_decode's return code): whether it was cut short."""
        elapsed = time.monotonic() - self._started
        with self._lock:
            self._rank = None
            aborted = rc == 2 and self._abort
            self._abort = False
        if aborted:
            self._armed = False
        elif rc == 0:
            prev = self._per_token[self._prefill]
            self._per_token[self._prefill] = prev + _SMOOTHING * (elapsed / self._tokens - prev)
        return aborted

    def request(self, rank: tuple[int, float]) -> bool:
        """A newcomer of `rank` is waiting: cut the call in flight short if it outranks all of
        the call's work and the call is less than half done. Whether it asked llama.cpp to."""
        with self._lock:
            if self._rank is None or self._abort or not rank < self._rank:
                return False
            if time.monotonic() - self._started >= self._expected / 2:
                return False
            self._abort = True
            return True
