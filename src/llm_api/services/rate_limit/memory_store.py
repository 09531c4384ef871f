"""The in-process store: the same sliding logs and leases as the Redis scripts, in memory.

Used when no Redis is configured (one process only) and as the bounded local fallback while Redis
is unreachable. Atomic because it never awaits between checking and taking.

Bounded without ever forgetting a live count: at most `max_keys` limit keys
(`LLM_API_RATE_LIMIT_MEMORY_MAX_KEYS`) are kept. Expired keys are swept first, oldest expiry
first (each period's keys are kept in the order they were last written, which is their order of
expiry, so a sweep costs only what it removes). When every key is still live, a request that
needs a new key is refused (StoreFull: 503 with Retry-After) and the subjects already counted
keep their counts. Dropping a live key instead would hand its subject a fresh quota, which a
client with many addresses could trigger at will. Memory is then at most `max_keys` keys plus
one entry per request admitted within each key's window.
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

    def expires_ms(self) -> int:
        return self.newest_ms + self.period_ms


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

    def expires_ms(self) -> int:
        return self.newest_ms


@dataclass(slots=True)
class _Budget:
    """One budget's period: spent plus reserved, and the outstanding reservations (as in the
    Redis script). Kept apart from the windows: their number is the budgets' (an operator's
    list), and each goes when its period (plus a day) is over."""

    expires_ms: int
    used: int = 0
    reserved: dict[str, int] = field(default_factory=dict)


BUDGET_GRACE_MS = 86_400_000


class StoreFull(Exception):
    """Every one of the store's `max_keys` keys holds a live count: a request that needs a new
    key is refused rather than any subject's count dropped."""

    def __init__(self, retry_ms: int) -> None:
        super().__init__("rate-limit memory full")
        self.retry_ms = retry_ms


class MemoryStore:
    # A full scan for expired keys (those the ordered sweep cannot reach yet) at most this often
    # while full, so a client that keeps asking for new keys cannot make every request O(keys).
    FULL_SCAN_INTERVAL_MS = 1000
    # The longest Retry-After a full store asks for (its oldest key may live for a day).
    MAX_FULL_RETRY_MS = 60_000

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, _Leases] = {}
        self._budgets: dict[str, _Budget] = {}
        # Per period, every key in the order it was last written (its expiry order).
        self._order: dict[int, dict[str, None]] = {}
        self._last_full_scan = -self.FULL_SCAN_INTERVAL_MS
        self._full = False

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    def _window(self, spec: LimitSpec) -> _Window:
        w = self._windows.get(spec.key)
        if w is None:
            w = self._windows[spec.key] = _Window(spec.period_ms)
            self._touch(spec.key, w.period_ms)
        return w

    def _lease(self, spec: LimitSpec) -> _Leases:
        c = self._leases.get(spec.key)
        if c is None:
            c = self._leases[spec.key] = _Leases(spec.period_ms)
            self._touch(spec.key, c.period_ms)
        return c

    def _touch(self, key: str, period_ms: int) -> None:
        """`key` was just written: it now expires after every other key of its period."""
        order = self._order.setdefault(period_ms, {})
        order.pop(key, None)
        order[key] = None

    def _get(self, key: str) -> _Window | _Leases | None:
        return self._windows.get(key) or self._leases.get(key)

    def _drop(self, key: str, period_ms: int) -> None:
        self._windows.pop(key, None)
        self._leases.pop(key, None)
        self._order[period_ms].pop(key, None)

    @property
    def keys(self) -> int:
        return len(self._windows) + len(self._leases)

    def _make_room(self, needed: int, now: int) -> None:
        """Room for `needed` new keys, by removing expired ones only; StoreFull when there is
        none."""
        if self.keys + needed <= self.max_keys:
            return
        for period_ms, order in self._order.items():
            gone = []
            for key in order:  # oldest expiry first: stop at the first live key
                obj = self._get(key)
                if obj is not None and not obj.expired(now):
                    break
                gone.append(key)
            for key in gone:
                self._drop(key, period_ms)
        if self.keys + needed > self.max_keys and (
            now - self._last_full_scan >= self.FULL_SCAN_INTERVAL_MS
        ):
            # Keys that expired out of order (a window that never took an entry).
            self._last_full_scan = now
            for period_ms, order in self._order.items():
                for key in [k for k in order if (o := self._get(k)) is None or o.expired(now)]:
                    self._drop(key, period_ms)
        if self.keys + needed <= self.max_keys:
            self._full = False
            return
        # The first key of each period expires first: room comes back then.
        fronts = [self._get(next(iter(order))) for order in self._order.values() if order]
        retry = min((o.expires_ms() for o in fronts if o is not None), default=now) - now
        if not self._full:
            self._full = True
            log.warning("rate_limit_memory_full", keys=self.keys, max_keys=self.max_keys)
        raise StoreFull(min(max(retry, 1000), self.MAX_FULL_RETRY_MS))

    def _budget(self, spec: LimitSpec, now: int) -> _Budget:
        b = self._budgets.get(spec.key)
        if b is None or b.expires_ms <= now:
            if b is None and len(self._budgets) >= self.max_keys:  # periods that ended
                for key in [k for k, old in self._budgets.items() if old.expires_ms <= now]:
                    del self._budgets[key]
            # A period this process has no count for starts from the ledger's (spec.floor).
            b = _Budget(now + spec.period_ms + BUDGET_GRACE_MS, spec.floor)
            self._budgets[spec.key] = b
        return b

    def admit_now(self, request_id: str, specs: list[LimitSpec]) -> Decision:
        now = self.now_ms()
        new_keys = sum(
            1
            for s in specs
            if s.kind != "budget" and s.key not in self._windows and s.key not in self._leases
        )
        if new_keys:
            self._make_room(new_keys, now)  # before anything is taken: all or nothing
        used: list[int] = []
        held: list[_Window | _Leases | _Budget] = []
        reject, retry = None, 0
        for i, spec in enumerate(specs):
            wait = 0
            if spec.kind == "budget":
                b = self._budget(spec, now)
                held.append(b)
                u = b.used
                if spec.cost > 0 and u + spec.cost > spec.limit:
                    wait = spec.period_ms
            elif spec.kind == "window":
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
            cost = 1 if spec.kind == "concurrency" else spec.cost
            remaining, reset = spec.limit - used[i], 0
            if reject is None:
                remaining -= cost
                obj = held[i]
                if isinstance(obj, _Budget):
                    obj.reserved[request_id] = cost
                    obj.used += cost
                    reset = spec.period_ms
                elif isinstance(obj, _Window):
                    w = obj
                    if cost > 0:
                        w.entries.append((now, request_id))
                        w.costs[request_id] = cost
                        w.used += cost
                        w.newest_ms = now
                        self._touch(spec.key, w.period_ms)
                    reset = spec.period_ms
                else:
                    c = obj
                    c.expiry[request_id] = c.newest_ms = now + spec.period_ms
                    self._touch(spec.key, c.period_ms)
            elif isinstance(last := held[i], _Window) and last.entries:
                reset = last.entries[-1][0] + spec.period_ms - now
            elif spec.kind == "budget":
                reset = spec.period_ms
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
    ) -> list[int]:
        return self.settle_now(request_id, settlements, leases)

    def settle_now(
        self, request_id: str, settlements: list[Settlement], leases: list[LimitSpec]
    ) -> list[int]:
        totals: list[int] = []
        for s in settlements:
            if s.spec.kind == "budget":
                b = self._budgets.get(s.spec.key)
                reserved = b.reserved.pop(request_id, None) if b is not None else None
                if b is None or reserved is None:
                    totals.append(-1)
                else:
                    b.used += s.used - reserved
                    totals.append(b.used)
                continue
            w = self._windows.get(s.spec.key)
            if w is not None and request_id in w.costs:
                w.used += s.used - w.costs[request_id]
                w.costs[request_id] = s.used
        for spec in leases:
            c = self._leases.get(spec.key)
            if c is not None:
                c.expiry.pop(request_id, None)
        return totals

    async def renew(self, leases: list[tuple[str, LimitSpec]]) -> None:
        now = self.now_ms()
        for request_id, spec in leases:
            c = self._leases.get(spec.key)
            if c is not None and request_id in c.expiry:
                c.expiry[request_id] = c.newest_ms = now + spec.period_ms
                self._touch(spec.key, c.period_ms)

    def in_flight(self, spec: LimitSpec) -> int:
        c = self._leases.get(spec.key)
        if c is None:
            return 0
        c.trim(self.now_ms())
        return len(c.expiry)

    async def aclose(self) -> None:
        self._windows.clear()
        self._leases.clear()
        self._budgets.clear()
        self._order.clear()
