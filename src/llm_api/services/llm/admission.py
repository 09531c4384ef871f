"""Per-model admission: at most `slots` requests generate at once, at most `max_waiting` wait,
and anyone beyond that is refused at once with 503 + Retry-After.

Who goes next (docs/fair-sharing.md):
- priority class first: interactive, then lowered (`x-llm-api-priority: low`), then Batch API
  work; a request waiting longer than `aging_seconds` is promoted to interactive, so nothing
  starves;
- within a class, weighted fair queuing across tenants (a team, else a user): each tenant has
  a virtual clock charged `cost / weight` tokens per request (prompt plus expected output),
  corrected when the request settles with its real tokens — the Virtual Token Counter of
  "Fairness in Serving Large Language Models" (OSDI 2024). A request starts at
  max(the gate's virtual time, its tenant's clock), so a tenant that was idle is lifted to the
  busy ones and cannot bank credit (start-time fair queuing);
- work-conserving over `slots`; `reserved` slots on top of them are kept for tenants below
  their weighted share: with every slot held by one busy tenant, a newcomer would otherwise
  wait for a long generation to end before its first token. They are extra capacity (the
  local engine is sized `slots + reserved`), so a lone tenant still has all `slots`.

Each admitted ticket records its tenant's share of the model at admission (`Ticket.share`):
the engine prefills prompts of tenants holding less first (engine/scheduler.py).

`policy.fair = False` is plain FIFO (no classes, no reservation), kept for comparison.

Hand-written because asyncio.Semaphore has no bound on its waiters and cannot refuse; the
refusal must be immediate so an overloaded server sheds load instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from llm_api.core.exceptions import OverloadedError

# Priority classes, first served first. A request may be lowered, never raised (api/deps.py).
PRIORITIES = ("interactive", "low", "batch")
INTERACTIVE, LOW, BATCH = range(3)


@dataclass(slots=True)
class Ticket:
    """One request asking for a slot: whose share it counts against and what it will cost.

    `used` is set by the holder before it releases the slot (prompt plus generated tokens):
    the tenant's clock is corrected by the difference to `cost`."""

    tenant: str = "anonymous"
    weight: float = 1.0
    cost: int = 1  # expected tokens: prompt plus max_tokens (or a default)
    priority: int = INTERACTIVE
    tier: str = "free"  # a bounded label for the metrics, never the tenant
    used: int | None = None
    waited: float = 0.0  # seconds in the queue, set on admission
    # Set on admission: the tenant's requests already running, per weight, and the rank the
    # local engine orders prompts by (class, then share; engine/scheduler.py, interrupt.py)
    # with the tenant's live standing, from which the engine reads the share as it is later.
    # Under FIFO every request ranks the same, so the engine keeps arrival order too.
    share: float = 0.0
    rank: tuple[int, float] = (INTERACTIVE, 0.0)
    standing: TenantStanding | None = None


@dataclass(frozen=True, slots=True)
class FairPolicy:
    fair: bool = True  # False: first come, first served
    aging_seconds: float = 10.0  # a lowered or batch request waiting this long goes interactive


@dataclass(slots=True)
class TenantLoad:
    """One tenant's standing in a gate, for the admin summary."""

    tenant: str
    tier: str
    running: int
    waiting: int
    position: int | None  # of its next request in the queue (0 = next), None if none waits
    expected_wait_seconds: float | None


@dataclass(slots=True, eq=False)
class TenantStanding:
    """A tenant's place in one gate. The engine thread reads `running` and `weight` of the
    tenants whose sequences it holds (plain attributes: a read is atomic, a stale one harmless)."""

    weight: float = 1.0
    tier: str = "free"
    finish: float = 0.0  # virtual time at which the work charged so far ends
    running: int = 0
    waiting: int = 0


@dataclass(slots=True, eq=False)
class _Waiter:
    ticket: Ticket
    start: float  # virtual start time
    seq: int
    since: float
    future: asyncio.Future[None]
    priority: int
    live: bool = True  # False once admitted or gone

    def key(self) -> tuple[int, float, int]:
        return (self.priority, self.start, self.seq)


@dataclass(slots=True)
class _Entry:
    """A heap entry; stale when its waiter was admitted, left (a cancelled task's future is
    cancelled at once, before the task runs its handler) or was promoted (lazy deletion)."""

    key: tuple[int, float, int]
    waiter: _Waiter = field(compare=False)

    def __lt__(self, other: _Entry) -> bool:
        return self.key < other.key

    @property
    def stale(self) -> bool:
        waiter = self.waiter
        return not waiter.live or waiter.future.done() or waiter.key() != self.key


class AdmissionGate:
    def __init__(
        self,
        name: str,
        slots: int,
        max_waiting: int,
        policy: FairPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        reserved: int = 0,
    ) -> None:
        """`slots` for anyone, plus `reserved` (fair queuing only) for tenants below their
        share: capacity the caller has on top of `slots` (priority.reserved_slots)."""
        self.name = name
        self.policy = policy or FairPolicy()
        self.reserved = reserved if self.policy.fair else 0
        self.slots = slots + self.reserved  # all it admits at once, the reserved included
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._clock = clock
        self._seq = itertools.count()
        self._heap: list[_Entry] = []
        self._lowered: deque[_Waiter] = deque()  # waiters below interactive, by arrival (aging)
        self._tenants: dict[str, TenantStanding] = {}
        self._vtime = 0.0  # the latest virtual start admitted: the gate's virtual time
        self._hold = 0.0  # moving average of how long a slot is held (expected waits)

    # --- acquire / release --------------------------------------------------------------------

    async def acquire(self, ticket: Ticket | None = None) -> float:
        """Wait for a slot; return the seconds waited. 503 at once when the queue is full."""
        ticket = ticket or Ticket()
        tenant = self._tenant(ticket)
        if self.running < self.slots and self._eligible(tenant):
            # Nobody eligible waits while a slot is free: straight in.
            self._vtime = max(self._vtime, self._charge(tenant, ticket))
            self._start(tenant, ticket)
            ticket.waited = 0.0
            return 0.0
        if self.waiting >= self.max_waiting:
            self._forget_if_idle(ticket.tenant, tenant)
            raise OverloadedError(
                f"Model `{self.name}` is at capacity; retry shortly.", retry_after=1
            )
        fair = self.policy.fair
        waiter = _Waiter(
            ticket,
            self._charge(tenant, ticket) if fair else 0.0,  # FIFO: by arrival alone
            next(self._seq),
            self._clock(),
            asyncio.get_running_loop().create_future(),
            ticket.priority if fair else INTERACTIVE,
        )
        self._push(waiter)
        if waiter.priority != INTERACTIVE:
            self._lowered.append(waiter)
        self.waiting += 1
        tenant.waiting += 1
        try:
            await waiter.future  # _dispatch hands a slot over by resolving this future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                ticket.used = 0  # handed a slot but leaving: pass it on, charge nothing
                self.release(ticket)
            elif waiter.live:
                waiter.live = False
                self.waiting -= 1
                tenant.waiting -= 1
                if self.policy.fair:
                    tenant.finish -= ticket.cost / ticket.weight  # never served: uncharged
                self._forget_if_idle(ticket.tenant, tenant)
                self._dispatch()  # the active set changed, so may the shares
            raise
        ticket.waited = self._clock() - waiter.since
        return ticket.waited

    def release(self, ticket: Ticket | None = None) -> None:
        """Give the slot back; `ticket.used` (when set) corrects the tenant's charge."""
        ticket = ticket or Ticket()
        tenant = self._tenants.get(ticket.tenant)
        self.running -= 1
        if tenant is not None:
            tenant.running -= 1
            if ticket.used is not None and self.policy.fair:
                tenant.finish += (ticket.used - ticket.cost) / ticket.weight
            self._forget_if_idle(ticket.tenant, tenant)
        self._dispatch()

    @asynccontextmanager
    async def slot(self, ticket: Ticket | None = None) -> AsyncIterator[Ticket]:
        ticket = ticket or Ticket()
        await self.acquire(ticket)
        started = self._clock()
        try:
            yield ticket
        finally:
            self._hold += (self._clock() - started - self._hold) * 0.1
            self.release(ticket)

    # --- who goes next ------------------------------------------------------------------------

    def _tenant(self, ticket: Ticket) -> TenantStanding:
        tenant = self._tenants.get(ticket.tenant)
        if tenant is None:
            tenant = self._tenants[ticket.tenant] = TenantStanding()
        tenant.weight, tenant.tier = ticket.weight, ticket.tier
        return tenant

    def _charge(self, tenant: TenantStanding, ticket: Ticket) -> float:
        """The request's virtual start; the tenant's clock moves on by its weighted cost."""
        start = max(self._vtime, tenant.finish)
        tenant.finish = start + ticket.cost / ticket.weight
        return start

    def _start(self, tenant: TenantStanding, ticket: Ticket) -> None:
        ticket.share = tenant.running / tenant.weight
        if self.policy.fair:
            ticket.rank = (ticket.priority, ticket.share)
            ticket.standing = tenant
        self.running += 1
        tenant.running += 1

    def _eligible(self, tenant: TenantStanding) -> bool:
        """A free slot beyond the reserved ones goes to anyone. A reserved one goes to a tenant
        below its weighted share of the unreserved slots, or to one at or above its share while
        such tenants hold fewer than the unreserved slots between them."""
        if self.slots - self.running > self.reserved:
            return True
        active = [t for t in self._tenants.values() if t.running or t.waiting]
        if tenant not in active:
            active.append(tenant)  # a newcomer counts itself in
        unreserved = self.slots - self.reserved
        per_weight = unreserved / sum(t.weight for t in active)
        if tenant.running < tenant.weight * per_weight:
            return True
        over = sum(t.running for t in active if t.running >= t.weight * per_weight)
        return over < unreserved

    def _push(self, waiter: _Waiter) -> None:
        heapq.heappush(self._heap, _Entry(waiter.key(), waiter))

    def _promote_aged(self) -> None:
        deadline = self._clock() - self.policy.aging_seconds
        while self._lowered and (not self._lowered[0].live or self._lowered[0].since <= deadline):
            waiter = self._lowered.popleft()
            if waiter.live:
                waiter.priority = INTERACTIVE  # its old entry is now stale
                self._push(waiter)

    def _next(self) -> _Entry | None:
        """The first waiter in (class, virtual start, arrival) order that may take a slot."""
        while self._heap and self._heap[0].stale:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        head = self._heap[0]
        if self._eligible(self._tenants[head.waiter.ticket.tenant]):
            return head
        # Only reserved slots are free: the best waiter below its share, if any (a scan of a
        # queue that is bounded by max_waiting, and only while the reservation is in play).
        eligible = [
            e
            for e in self._heap
            if not e.stale and self._eligible(self._tenants[e.waiter.ticket.tenant])
        ]
        return min(eligible, default=None)

    def _dispatch(self) -> None:
        if self.policy.fair and self._lowered:
            self._promote_aged()
        while self.running < self.slots:
            entry = self._next()
            if entry is None:
                break
            waiter = entry.waiter
            waiter.live = False
            tenant = self._tenants[waiter.ticket.tenant]
            self.waiting -= 1
            tenant.waiting -= 1
            self._vtime = max(self._vtime, waiter.start)
            self._start(tenant, waiter.ticket)
            waiter.future.set_result(None)
        if len(self._heap) > 2 * self.waiting + 64:  # drop stale entries now and then
            self._heap = [e for e in self._heap if not e.stale]
            heapq.heapify(self._heap)

    def _forget_if_idle(self, name: str, tenant: TenantStanding) -> None:
        """An idle tenant's clock matters only while it is ahead of the gate's: behind it, it
        would be lifted anyway. Forgetting it keeps the table to the recently active."""
        if not tenant.running and not tenant.waiting and tenant.finish <= self._vtime:
            self._tenants.pop(name, None)

    # --- visibility ---------------------------------------------------------------------------

    def depth(self) -> dict[tuple[str, str], int]:
        """Waiting requests by (priority class, tier): bounded labels for the metrics."""
        counts: dict[tuple[str, str], int] = {}
        for entry in self._heap:
            if not entry.stale:
                label = (PRIORITIES[entry.waiter.priority], entry.waiter.ticket.tier)
                counts[label] = counts.get(label, 0) + 1
        return counts

    def tenants(self) -> list[TenantLoad]:
        """Each active tenant's load, its next request's place in the queue and a rough
        expected wait (places ahead × average slot hold ÷ slots)."""
        order = sorted(e for e in self._heap if not e.stale)
        first: dict[str, int] = {}
        for place, entry in enumerate(order):
            first.setdefault(entry.waiter.ticket.tenant, place)
        loads = []
        for name, t in self._tenants.items():
            if not t.running and not t.waiting:
                continue
            position = first.get(name)
            wait = None
            if position is not None:
                wait = round((position + 1) * self._hold / max(self.slots, 1), 3)
            loads.append(TenantLoad(name, t.tier, t.running, t.waiting, position, wait))
        return sorted(loads, key=lambda x: (x.position is None, x.position or 0, x.tenant))
