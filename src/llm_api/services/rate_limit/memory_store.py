"""The in-process store: the same sliding logs and leases as the Redis scripts, in memory.

Used when no Redis is configured (one process only) and as the bounded local fallback while Redis
is unreachable. Atomic because it never awaits between checking and taking. Bounded: at most
`max_keys` limit keys are kept; expired ones are swept first, then the oldest are dropped.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import structlog

from llm_api.services.rate_limit.types import Decision, LimitSpec, LimitState, Settlement

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Window:
    period_ms: int
    entries: collections.deque[tuple[int, str]] = field(default_factory=collections.deque)
    costs: dict[str, int] = field(default_factory=dict)
    used: int = 0
    newest_ms: int = 0

    def trim(self, now: int) -> None:
        while self.entries and self.entries[0][0] <= now - self.period_ms:
            _, rid = self.entries.popleft()
            self.used -= self.costs.pop(rid, 0)
        if not self.entries:
            self.used = 0

    def expired(self, now: int) -> bool:
        return self.newest_ms <= now - self.period_ms


@dataclass(slots=True)
class _Leases:
    period_ms: int
    expiry: dict[str, int] = field(default_factory=dict)
    newest_ms: int = 0

    def trim(self, now: int) -> None:
        for rid in [r for r, at in self.expiry.items() if at <= now]:
            del self.expiry[rid]

    def expired(self, now: int) -> bool:
        return self.newest_ms <= now


class MemoryStore:
    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, _Leases] = {}

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    def _window(self, spec: LimitSpec) -> _Window:
        w = self._windows.get(spec.key)
        if w is None:
            self._make_room()
            w = self._windows[spec.key] = _Window(spec.period_ms)
        return w

    def _lease(self, spec: LimitSpec) -> _Leases:
        c = self._leases.get(spec.key)
        if c is None:
            self._make_room()
            c = self._leases[spec.key] = _Leases(spec.period_ms)
        return c

    def _make_room(self) -> None:
        if len(self._windows) + len(self._leases) < self.max_keys:
            return
        now = self.now_ms()
        for table in (self._windows, self._leases):
            for key in [k for k, v in table.items() if v.expired(now)]:
                del table[key]
        while len(self._windows) + len(self._leases) >= self.max_keys:
            table = self._windows if len(self._windows) >= len(self._leases) else self._leases
            dropped = next(iter(table))
            del table[dropped]  # the oldest key: its subject's count starts over
            log.warning("rate_limit_memory_full", dropped=dropped.split(":", 1)[0])

    def admit_now(self, request_id: str, specs: list[LimitSpec]) -> Decision:
        now = self.now_ms()
        used: list[int] = []
        held: list[_Window | _Leases] = []
        reject, retry = None, 0
        for i, spec in enumerate(specs):
            wait = 0
            if spec.kind == "window":
                w = self._window(spec)
                held.append(w)
                w.trim(now)
                u = w.used
                if u + spec.cost > spec.limit:
                    wait = spec.period_ms
                    if spec.cost <= spec.limit:
                        need, freed = u + spec.cost - spec.limit, 0
                        for at, rid in w.entries:
                            freed += w.costs.get(rid, 0)
                            if freed >= need:
                                wait = at + spec.period_ms - now
                                break
            else:
                c = self._lease(spec)
                held.append(c)
                c.trim(now)
                u = len(c.expiry)
                if u + 1 > spec.limit:
                    wait = 1000
            used.append(u)
            if wait > 0 and wait >= retry:
                reject, retry = i, wait
        states = []
        for i, spec in enumerate(specs):
            cost = spec.cost if spec.kind == "window" else 1
            remaining, reset = spec.limit - used[i], 0
            if reject is None:
                remaining -= cost
                obj = held[i]
                if isinstance(obj, _Window):
                    w = obj
                    if cost > 0:
                        w.entries.append((now, request_id))
                        w.costs[request_id] = cost
                        w.used += cost
                        w.newest_ms = now
                    reset = spec.period_ms
                else:
                    c = obj
                    c.expiry[request_id] = c.newest_ms = now + spec.period_ms
            elif isinstance(last := held[i], _Window) and last.entries:
                reset = last.entries[-1][0] + spec.period_ms - now
            states.append(LimitState(max(0, remaining), reset))
        return Decision(reject is None, now, states, reject, retry)

    async def admit(self, request_id: str, specs: list[LimitSpec]) -> Decision:
        return self.admit_now(request_id, specs)

    async def settle(
        self,
        request_id: str,
        admitted_ms: int,
        settlements: list[Settlement],
        leases: list[LimitSpec],
    ) -> None:
        self.settle_now(request_id, settlements, leases)

    def settle_now(
        self, request_id: str, settlements: list[Settlement], leases: list[LimitSpec]
    ) -> None:
        for s in settlements:
            w = self._windows.get(s.spec.key)
            if w is not None and request_id in w.costs:
                w.used += s.used - w.costs[request_id]
                w.costs[request_id] = s.used
        for spec in leases:
            c = self._leases.get(spec.key)
            if c is not None:
                c.expiry.pop(request_id, None)

    async def renew(self, leases: list[tuple[str, LimitSpec]]) -> None:
        now = self.now_ms()
        for request_id, spec in leases:
            c = self._leases.get(spec.key)
            if c is not None and request_id in c.expiry:
                c.expiry[request_id] = c.newest_ms = now + spec.period_ms

    def in_flight(self, spec: LimitSpec) -> int:
        c = self._leases.get(spec.key)
        if c is None:
            return 0
        c.trim(self.now_ms())
        return len(c.expiry)

    async def aclose(self) -> None:
        self._windows.clear()
        self._leases.clear()
