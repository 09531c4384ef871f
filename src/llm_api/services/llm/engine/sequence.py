"""One sequence's state inside the batched engine, and the bridge back to its coroutine.

The engine thread owns every field except `cancelled`, which the request's coroutine sets when
the client goes away; the engine reads it at the start of each step (a plain bool: assignment
is atomic under the GIL, and a step late is fine).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_api.services.llm.text_stream import TextAssembler
from llm_api.services.llm.tools.grammar import CallTrigger
from llm_api.services.llm.types import (
    FinishReason,
    Frame,
    SamplingParams,
    Standing,
    TokenLogprob,
)

Deliverable = Frame | BaseException


class Sink:
    """Where one sequence's output goes: an asyncio queue on the request's event loop, plus a
    future that resolves once the engine has freed the sequence's slot."""

    __slots__ = ("loop", "queue", "released")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Deliverable] = asyncio.Queue()
        self.released: asyncio.Future[None] = loop.create_future()

    def release(self) -> None:  # runs on the event loop
        if not self.released.done():
            self.released.set_result(None)


@dataclass(slots=True, eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    gbnf: str | None
    seed: int
    sink: Sink
    cancelled: bool = False
    # Prefill order, lower first: (priority class, the tenant's share when admitted); see
    # GenerationRequest.prefill_rank. With `standing`, the share is read live (`live_rank`).
    rank: tuple[int, float] = (0, 0.0)
    standing: Standing | None = None
    # auto tool choice: engages the call grammar once the output opens a call (tools/grammar)
    trigger: CallTrigger | None = None
    # --- engine thread only ---
    slot: int = -1
    tokens: list[int] = field(default_factory=list)  # prompt + sampled tokens
    n_past: int = 0  # how many of `tokens` are in this slot's KV cache
    kernels: bytearray = field(default_factory=bytearray)  # per cached token, see exact_reuse
    produced: int = 0  # completion tokens (EOG not counted)
    unsent: int = 0  # produced tokens whose text is still held back
    reused: int = 0  # prompt tokens taken from a KV cache instead of evaluated
    # Logprobs of the `unsent` tokens (they leave with the frame that carries their text);
    # None when the request did not ask for logprobs.
    logprobs: list[TokenLogprob] | None = None
    chain: Any = None  # llama_sampler chain
    text: TextAssembler | None = None
    finish: FinishReason | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    def live_rank(self) -> tuple[int, float]:
        """The rank with the tenant's share as it is now (its other requests holding a slot,
        per weight): a tenant's first request after a quiet spell ranked 0 when admitted, but
        once the tenant fills the model again it is one of many."""
        s = self.standing
        if s is None:
            return self.rank
        return (self.rank[0], max(0, s.running - 1) / s.weight)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The pending logprobs, for the frame about to leave (None if there are none)."""
        pending = self.logprobs
        if not pending:
            return None
        self.logprobs = []
        return pending


class Outbox:
    """Output of one engine step, delivered with one `call_soon_threadsafe` per event loop
    instead of one per token: each such call writes to the loop's self-pipe and wakes it."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[Sink, Deliverable | None]]] = {}

    def put(self, sink: Sink, item: Deliverable | None) -> None:
        """`None` means: the slot is free (resolves `sink.released`)."""
        self._items.setdefault(sink.loop, []).append((sink, item))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            if not loop.is_closed():
                # RuntimeError: the loop closed between the check and the call.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Sink, Deliverable | None]]) -> None:
    for sink, item in batch:
        if item is None:
            sink.release()
        else:
            sink.queue.put_nowait(item)


DetokenizeFn = Callable[[int], bytes]
