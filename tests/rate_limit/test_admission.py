"""The per-model admission gate (services/llm/admission.py): N generate, a bounded FIFO waits,
and anyone beyond is refused at once with 503 + Retry-After (the live test drives it over HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from llm_api.core.exceptions import OverloadedError
from llm_api.services.llm.admission import AdmissionGate


async def test_bounded_queue_refuses_at_once() -> None:
    gate = AdmissionGate("m", slots=1, max_waiting=2)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate.waiting == 2
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(OverloadedError) as info:
        await gate.acquire()
    assert loop.time() - start < 0.05  # refused at once, not after waiting
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    # FIFO hand-over: each release admits the oldest waiter.
    gate.release()
    await asyncio.wait_for(waiters[0], 1)
    assert not waiters[1].done()
    gate.release()
    await asyncio.wait_for(waiters[1], 1)
    gate.release()
    assert gate.running == 0 and gate.waiting == 0


async def test_cancelled_waiter_gives_its_place_back() -> None:
    gate = AdmissionGate("m", slots=1, max_waiting=1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.waiting == 0
    gate.release()
    assert gate.running == 0
    async with gate.slot():
        assert gate.running == 1
    assert gate.running == 0
