"""Fair queuing in the admission gate (services/llm/admission.py), at the gate: who goes next
when tenants compete, by weight, by priority class, with aging and the reserved slot. No clock
and no model: a driver releases the oldest slot holder and the tenant asks again, so each test
is a fixed sequence of hand-overs (the HTTP-level test is tests/test_fair_sharing_http.py)."""

from __future__ import annotations

import asyncio
import collections

import pytest

from llm_api.core.exceptions import OverloadedError
from llm_api.services.llm.admission import (
    BATCH,
    LOW,
    AdmissionGate,
    FairPolicy,
    TenantStanding,
    Ticket,
)
from llm_api.services.llm.engine.scheduler import Scheduler
from llm_api.services.llm.engine.sequence import Sequence


async def settle() -> None:
    """Let every task that can run do so (hand-overs resolve futures; their owners resume)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Saturating:
    """Tenants that each keep `depth` requests asking for a gate, forever: a driver releases
    the oldest holder, and its tenant asks again at once."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate
        self.held: collections.deque[Ticket] = collections.deque()
        self.tasks: list[asyncio.Task[None]] = []
        self.specs: dict[str, tuple[float, int, int, int]] = {}

    def add(self, tenant: str, weight: float, cost: int, used: int, depth: int, prio: int = 0):
        self.specs[tenant] = (weight, cost, used, prio)
        for _ in range(depth):
            self.ask(tenant)

    def ask(self, tenant: str) -> None:
        weight, cost, used, prio = self.specs[tenant]

        async def one() -> None:
            ticket = Ticket(tenant=tenant, weight=weight, cost=cost, priority=prio)
            await self.gate.acquire(ticket)
            ticket.used = used
            self.held.append(ticket)

        self.tasks.append(asyncio.create_task(one()))

    async def run(self, rounds: int, warmup: int = 0) -> collections.Counter[str]:
        """Completed tokens per tenant over `rounds` hand-overs (after `warmup` more)."""
        done: collections.Counter[str] = collections.Counter()
        await settle()
        for i in range(warmup + rounds):
            ticket = self.held.popleft()
            self.gate.release(ticket)
            if i >= warmup:
                done[ticket.tenant] += ticket.used or 0
            self.ask(ticket.tenant)
            await settle()
        return done

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("fair", [True, False])
async def test_weights_3_to_1_split_completed_tokens(fair: bool) -> None:
    """Both saturating, weights 3:1: completed tokens split 3:1 within 10%, although the
    heavier tenant's requests are charged three times what they turn out to use (the charge
    is corrected when each settles) and the other's are half the size. FIFO (fair=False)
    splits by who asks more often instead, which here is 1:1 in requests."""
    gate = AdmissionGate("m", slots=4, max_waiting=64, policy=FairPolicy(fair=fair))
    load = Saturating(gate)
    load.add("team:heavy", weight=3, cost=300, used=100, depth=8)
    load.add("user:light", weight=1, cost=50, used=50, depth=8)
    try:
        done = await load.run(rounds=400, warmup=40)
    finally:
        await load.close()
    ratio = done["team:heavy"] / done["user:light"]
    if fair:
        assert 2.7 <= ratio <= 3.3, done
    else:
        assert ratio == pytest.approx(2.0, rel=0.1), done  # 1:1 in requests, 100 vs 50 tokens


async def test_a_tenant_arriving_at_an_idle_gate_is_admitted_at_once() -> None:
    gate = AdmissionGate("m", slots=2, max_waiting=4)
    # Someone used the gate heavily before: that is no reason to make a newcomer wait.
    for _ in range(10):
        heavy = Ticket(tenant="team:a", cost=1000)
        await gate.acquire(heavy)
        gate.release(heavy)
    ticket = Ticket(tenant="user:b", cost=10)
    waited = await gate.acquire(ticket)  # returns without suspending: nothing to wait for
    assert waited == 0.0 and gate.running == 1 and gate.waiting == 0


async def test_an_idle_tenant_banks_no_credit() -> None:
    """A tenant idle while another was served is lifted to the busy one's clock on arrival:
    its queued requests then alternate with the busy tenant's instead of all going first."""
    gate = AdmissionGate("m", slots=1, max_waiting=64, policy=FairPolicy())
    load = Saturating(gate)
    load.add("user:busy", weight=1, cost=10, used=10, depth=4)
    try:
        await load.run(rounds=50)  # busy's clock is far ahead of an unseen tenant's 0
        load.add("user:late", weight=1, cost=10, used=10, depth=4)
        await settle()
        order = []
        for _ in range(8):
            ticket = load.held.popleft()
            gate.release(ticket)
            await settle()
            order.append(load.held[-1].tenant)
            load.ask(ticket.tenant)
    finally:
        await load.close()
    assert order.count("user:late") == 4  # its share, not all eight
    assert order[:4].count("user:late") <= 2


async def test_requests_admitted_at_once_also_move_the_gate_clock() -> None:
    """A tenant whose requests never had to wait still used the model: a newcomer is lifted to
    its clock, not to where the gate's clock stood before all that work."""
    gate = AdmissionGate("m", slots=2, max_waiting=64, policy=FairPolicy())
    for _ in range(20):
        ticket = Ticket(tenant="user:busy", cost=10)
        assert await gate.acquire(ticket) == 0.0
        gate.release(ticket)
    load = Saturating(gate)
    load.add("user:busy", weight=1, cost=10, used=10, depth=6)  # 2 run, 4 wait
    await settle()
    load.add("user:late", weight=1, cost=10, used=10, depth=4)
    await settle()  # all four queued before any slot frees
    try:
        order = []
        for _ in range(4):
            gate.release(load.held.popleft())
            await settle()
            order.append(load.held[-1].tenant)
    finally:
        await load.close()
    assert order.count("user:late") == 2, order  # alternating, not four in a row


async def test_interactive_goes_before_lowered_and_batch() -> None:
    gate = AdmissionGate("m", slots=1, max_waiting=8)
    first = Ticket(tenant="user:x")
    await gate.acquire(first)
    admitted: list[str] = []

    async def ask(name: str, priority: int) -> None:
        ticket = Ticket(tenant=f"user:{name}", priority=priority)
        await gate.acquire(ticket)
        admitted.append(name)
        gate.release(ticket)

    tasks = [
        asyncio.create_task(ask("batch", BATCH)),
        asyncio.create_task(ask("low", LOW)),
        asyncio.create_task(ask("interactive", 0)),
    ]
    await settle()
    gate.release(first)
    await asyncio.gather(*tasks)
    assert admitted == ["interactive", "low", "batch"]


async def test_a_lowered_request_completes_under_constant_interactive_load() -> None:
    """Aging: interactive requests always wait, so a `low` one never goes first on its own;
    once it has waited `aging_seconds` it is served as interactive."""
    now = [0.0]
    gate = AdmissionGate(
        "m",
        slots=2,
        max_waiting=64,
        policy=FairPolicy(aging_seconds=5),
        clock=lambda: now[0],
    )
    load = Saturating(gate)
    load.add("user:chat", weight=1, cost=10, used=10, depth=6)
    load.add("user:other", weight=1, cost=10, used=10, depth=6)
    lowered = Ticket(tenant="user:patient", priority=LOW, cost=10)
    waiting = asyncio.create_task(gate.acquire(lowered))
    try:
        await load.run(rounds=40)
        assert not waiting.done()  # starved without aging: interactive always goes first
        now[0] += 5
        await load.run(rounds=1)
        assert waiting.done() and lowered.waited == 5
    finally:
        waiting.cancel()
        await load.close()


async def test_the_reserved_slot_goes_only_to_a_tenant_below_its_share() -> None:
    """The reserved slot is on top of `slots`: a tenant alone has all 8 of them (and not the
    ninth); a newcomer takes the ninth at once; admission records each tenant's share."""
    gate = AdmissionGate("m", slots=8, max_waiting=64, reserved=1)
    load = Saturating(gate)
    load.add("user:flood", weight=1, cost=10, used=10, depth=16)
    try:
        await settle()
        assert gate.running == 8 and gate.waiting == 8  # alone, it has every unreserved slot
        assert sorted(t.share for t in load.held) == list(range(8))  # 0..7 already running
        newcomer = Ticket(tenant="user:new")
        assert await gate.acquire(newcomer) == 0.0  # ... and a newcomer is let in at once
        assert gate.running == 9 and newcomer.share == 0.0
        await load.run(rounds=20)  # the flood's releases hand over among its own requests
        assert gate.running == 9 and len(load.held) == 8
        gate.release(newcomer)
        await settle()
        assert gate.running == 8  # the reserved slot is free again, not the flood's
    finally:
        await load.close()


async def test_fifo_policy_has_no_reserved_slot_and_no_classes() -> None:
    gate = AdmissionGate("m", slots=8, max_waiting=64, policy=FairPolicy(fair=False), reserved=1)
    assert gate.slots == 8  # FIFO takes no reserved slot, even where the engine has one
    tickets = [Ticket(tenant="user:flood") for _ in range(8)]
    for ticket in tickets:
        assert await gate.acquire(ticket) == 0.0
    order: list[str] = []

    ranks: list[tuple[int, float]] = []

    async def ask(name: str, priority: int) -> None:
        ticket = Ticket(tenant=f"user:{name}", priority=priority)
        await gate.acquire(ticket)
        order.append(name)
        ranks.append(ticket.rank)

    tasks = [asyncio.create_task(ask("batch", BATCH)), asyncio.create_task(ask("chat", 0))]
    await settle()
    gate.release(tickets[0])
    gate.release(tickets[1])
    await asyncio.gather(*tasks)
    assert order == ["batch", "chat"]  # arrival order
    # ...in the engine too: one rank for all, so no prompt goes ahead and no call is cut short
    assert {t.rank for t in tickets} | set(ranks) == {(0, 0.0)}
    assert tickets[7].share == 7.0  # still recorded
    assert all(t.standing is None for t in tickets)  # no live share either


async def test_a_waiter_cancelled_just_before_a_release_is_skipped() -> None:
    """Cancelling a task cancels its future at once, but its handler runs later: a release in
    between must pass the slot to the next waiter, not to the one leaving."""
    gate = AdmissionGate("m", slots=1, max_waiting=4)
    holder = Ticket(tenant="user:a")
    await gate.acquire(holder)
    leaving = asyncio.create_task(gate.acquire(Ticket(tenant="user:b")))
    staying = asyncio.create_task(gate.acquire(Ticket(tenant="user:c")))
    await settle()
    leaving.cancel()
    gate.release(holder)  # before `leaving` has run its handler
    await asyncio.gather(leaving, return_exceptions=True)
    await asyncio.wait_for(staying, 1)
    assert gate.running == 1 and gate.waiting == 0


async def test_full_queue_is_503_with_retry_after_whatever_the_tenant() -> None:
    gate = AdmissionGate("m", slots=1, max_waiting=2)
    await gate.acquire(Ticket(tenant="user:a"))
    waiters = [asyncio.create_task(gate.acquire(Ticket(tenant="user:a"))) for _ in range(2)]
    await settle()
    with pytest.raises(OverloadedError) as info:
        await gate.acquire(Ticket(tenant="user:b", priority=0))  # fairness is no way past it
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert gate.waiting == 0


async def test_tenants_report_position_and_expected_wait() -> None:
    gate = AdmissionGate("m", slots=1, max_waiting=8, policy=FairPolicy())
    holder = Ticket(tenant="user:a", tier="paid")
    await gate.acquire(holder)
    tasks = [
        asyncio.create_task(gate.acquire(Ticket(tenant="user:a", tier="paid", cost=10)))
        for _ in range(2)
    ]
    tasks.append(asyncio.create_task(gate.acquire(Ticket(tenant="user:b", cost=10))))
    await settle()
    loads = {t.tenant: t for t in gate.tenants()}
    assert loads["user:a"].running == 1 and loads["user:a"].waiting == 2
    # a holds the slot already, so b (who holds nothing) goes before a's next
    assert loads["user:b"].position == 0 and loads["user:a"].position == 1
    assert loads["user:b"].expected_wait_seconds is not None
    assert gate.depth() == {("interactive", "paid"): 2, ("interactive", "free"): 1}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gate.release(holder)
    assert gate.tenants() == [] and gate.running == 0


def seq(rank: tuple[int, float], n: int) -> Sequence:
    """An engine sequence with an `n`-token prompt and the rank admission gave it."""
    return Sequence(prompt=list(range(n)), params=None, gbnf=None, seed=0, sink=None, rank=rank)  # type: ignore[arg-type]


def test_the_engine_prefills_the_tenant_holding_less_first() -> None:
    """A burst of a busy tenant's new prompts (ranked by the share its tenant held when each was
    admitted) and, admitted after them, a prompt of a tenant holding nothing: the newcomer's
    chunk is the first of the step, and it gets a slot first when slots are short. Oldest first
    among equal ranks, as before."""
    scheduler = Scheduler(slots=4, budget=512, prefix_cache=False)

    busy = [seq((0, 14.0), 200), seq((0, 15.0), 200), seq((0, 15.0), 200)]
    batch_line = seq((2, 0.0), 50)  # a Batch API line: after every interactive prompt
    newcomer = seq((0, 0.0), 30)
    scheduler.waiting.extend([*busy, batch_line, newcomer])
    admitted = [a.seq for a in scheduler.admit()]
    assert admitted == [newcomer, busy[0], busy[1], busy[2]]  # four slots; the batch line waits
    scheduler.begin_step()
    order = []
    while (work := scheduler.next_prefill()) is not None:
        order.append(work.seq)
        work.seq.n_past = work.start + len(work.tokens)
    assert order[:3] == [newcomer, busy[0], busy[1]]  # ...and busy[2] if the budget allows


def test_between_chunks_only_a_sequence_outranking_every_pending_prompt_joins() -> None:
    scheduler = Scheduler(slots=4, budget=512, prefix_cache=False)

    busy = [seq((0, 15.0), 100), seq((0, 15.0), 100)]
    scheduler.waiting.extend(busy)
    scheduler.admit()
    scheduler.begin_step()
    first = scheduler.next_prefill()
    assert first is not None and first.seq is busy[0]
    busy[0].n_past = 100
    late_busy, newcomer = seq((0, 15.0), 20), seq((0, 0.0), 20)
    scheduler.waiting.extend([late_busy, newcomer])
    assert [a.seq for a in scheduler.admit_ahead()] == [newcomer]  # the busy one waits
    assert list(scheduler.waiting) == [late_busy]
    second = scheduler.next_prefill()
    assert second is not None and second.seq is newcomer  # before busy[1]'s prompt
    newcomer.n_past = 20
    busy[1].n_past = 100
    # No prompt pending: only a sequence outranking every one in the decode call would join.
    assert scheduler.admit_ahead() == []


def test_before_the_decode_call_a_sequence_outranking_all_of_it_joins_first() -> None:
    """Once the step's prompts are done, a newcomer ranked below every decoding sequence is
    admitted and its prompt is the step's next call (the engine may even cut the decode call
    short for it: engine/interrupt.py); one of the same rank as the decoders waits. A chunk
    whose call was cut short gives its tokens back to the step's budget."""
    scheduler = Scheduler(slots=4, budget=64, prefix_cache=False)
    busy = [seq((0, 15.0), 10), seq((0, 14.0), 10)]
    scheduler.waiting.extend(busy)
    scheduler.admit()
    for s in busy:
        s.n_past = 10
    scheduler.begin_step()
    same, light = seq((0, 14.0), 60), seq((0, 1.0), 60)
    scheduler.waiting.extend([same, light])
    assert [a.seq for a in scheduler.admit_ahead()] == [light]
    chunk = scheduler.next_prefill()
    assert chunk is not None and chunk.seq is light and chunk.start == 0
    scheduler.retract(chunk)  # cut short: its share of the budget is back
    again = scheduler.next_prefill()
    assert again is not None and again.seq is light and again.tokens == chunk.tokens


def test_a_tenants_share_is_read_live_not_frozen_at_admission() -> None:
    """A busy tenant's first request after a quiet spell was admitted holding nothing (share
    0); once the tenant holds 16 slots it is one of many: a newcomer holding nothing outranks
    it, joins before the decode call and may cut it short."""
    busy, light = TenantStanding(running=1), TenantStanding(running=1)
    first = seq((0, 0.0), 10)
    first.standing = busy
    scheduler = Scheduler(slots=4, budget=64, prefix_cache=False)
    scheduler.waiting.append(first)
    scheduler.admit()
    first.n_past = 10
    scheduler.begin_step()
    newcomer = seq((0, 0.0), 10)
    newcomer.standing = light
    scheduler.waiting.append(newcomer)
    assert scheduler.admit_ahead() == []  # both hold nothing else: equals, no cut in line
    busy.running = 16  # the busy tenant's other requests were admitted since
    assert first.live_rank() == (0, 15.0) and newcomer.live_rank() == (0, 0.0)
    assert [a.seq for a in scheduler.admit_ahead()] == [newcomer]
