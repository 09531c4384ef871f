"""A newcomer that outranks everything in the batched engine's call in flight cuts it short
(engine/interrupt.py), functional, not timed: the newcomer's first token comes before the
work it cut in on, that work is redone, and every output is exactly what it is uninterrupted
(greedy), including when the cut call spans several micro-batches (slots with a gap)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from llm_api.core import metrics
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.registry import builtin_registry
from llm_api.services.llm.types import GenerationRequest, Message, SamplingParams
from tests.conftest import MODEL

pytestmark = pytest.mark.model

BUSY = (0, 15.0)  # a busy tenant's share when its request was admitted
LIGHT = (0, 0.0)  # a tenant holding nothing


def _request(content: str, rank: tuple[int, float], max_tokens: int) -> GenerationRequest:
    req = GenerationRequest(
        request_id="interrupt",
        model=MODEL,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
        messages=[Message("user", content)],
    )
    req.prefill_rank = rank
    return req


async def _backend(app: Any, name: str, slots: int) -> LlamaBatchedBackend:
    """The built-in model with `slots` slots plus one reserved, and no prefix cache (so that
    every run evaluates its whole prompt, and a long one is one long call)."""
    threads = app.state.llm_api.llm.backends[MODEL]._threads
    update = {"id": name, "slots": slots, "prefix_cache": False, "n_batch": 512}
    config = builtin_registry().models[0].model_copy(update=update)
    backend = LlamaBatchedBackend(config, threads=threads, reserved=1)
    await backend.start(warmup=False)
    return backend


async def _run(backend: LlamaBatchedBackend, req: GenerationRequest, firsts: list[str]) -> str:
    if "tokens" not in req.engine_state:
        await backend.prepare(req)
    parts: list[str] = []
    async for frame in backend.generate(req):
        if not parts:
            firsts.append(req.messages[0].content)  # type: ignore[arg-type]
        parts.append(frame.text)
    return "".join(parts)


async def _until_in_flight(engine: Any, rank: tuple[int, float], prefill: bool) -> None:
    while engine._interrupt.in_flight != (rank, prefill):
        await asyncio.sleep(0.001)


async def test_a_newcomer_cuts_a_long_prompt_chunk_short(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """...and llama.cpp's lines about the aborted call are logged at DEBUG, not as errors
    (backends/llama_log.py)."""
    caplog.set_level(logging.DEBUG, logger="llama_cpp")
    backend = await _backend(app, "interrupt-chunk", slots=1)
    engine = backend.engine
    assert engine is not None
    story = " ".join(["The keeper climbed the stairs and lit the lamp at dusk."] * 36)
    try:
        busy = _request(story + " Summarise this.", BUSY, 6)
        light = _request("Say hello.", LIGHT, 6)
        solo = [await _run(backend, r, []) for r in (busy, light)]  # also times the calls
        assert busy.prompt_tokens is not None and busy.prompt_tokens > 400
        before = engine.interrupted
        counter = metrics.ENGINE_CALLS_INTERRUPTED.labels("interrupt-chunk")
        counted = counter._value.get()

        firsts: list[str] = []
        busy = _request(story + " Summarise this.", BUSY, 6)
        light = _request("Say hello.", LIGHT, 6)
        await backend.prepare(light)  # tokenized: submitted the moment it is asked to run
        task = asyncio.create_task(_run(backend, busy, firsts))
        await _until_in_flight(engine, BUSY, prefill=True)  # its ~440-token chunk is running
        light_text = await _run(backend, light, firsts)
        busy_text = await task

        assert engine.interrupted == before + 1
        assert counter._value.get() == counted + 1
        assert firsts[0] == "Say hello."  # it did not wait for the long chunk
        assert [busy_text, light_text] == solo  # the cut chunk was redone, exactly
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llama_cpp"]
        assert any("removing memory module entries" in m for _, m in lines), lines
        assert all(level == logging.DEBUG for level, _ in lines), lines
    finally:
        await backend.aclose()


async def test_cut_decode_calls_over_slots_with_a_gap_change_no_output(app: Any) -> None:
    """Slots 0 and 2 decoding, slot 1 freed: each decode call is two micro-batches, and a
    cut may land in the second, after the first has written its cells; they are removed
    too, so the redone call gives exactly the uninterrupted tokens."""
    backend = await _backend(app, "interrupt-decode", slots=3)
    engine = backend.engine
    assert engine is not None
    prompts = ["Count from 1 to 200.", "Name the days of the week.", "Spell the word lamp."]
    try:

        def busy() -> list[GenerationRequest]:
            return [_request(prompts[0], BUSY, 60), _request(prompts[1], BUSY, 2),
                    _request(prompts[2], BUSY, 60)]  # fmt: skip

        solo = [await _run(backend, r, []) for r in busy()]
        light_solo = await _run(backend, _request("Say hello.", LIGHT, 2), [])
        before = engine.interrupted

        reqs = busy()
        for r in reqs:  # tokenized first: submitted in this order, so in slots 0, 1, 2
            await backend.prepare(r)
        tasks = [asyncio.create_task(_run(backend, r, [])) for r in reqs]
        await tasks[1]  # slot 1 is free: slots 0 and 2 decode in two micro-batches
        lights: list[str] = []
        for _ in range(12):
            if all(t.done() for t in tasks) or engine.interrupted - before >= 3:
                break
            light = _request("Say hello.", LIGHT, 2)
            await backend.prepare(light)
            await _until_in_flight(engine, BUSY, prefill=False)
            lights.append(await _run(backend, light, []))
        got = [await t for t in tasks]

        assert engine.interrupted > before, "no decode call was cut short"
        assert got == solo
        assert lights and set(lights) == {light_solo}
    finally:
        await backend.aclose()


async def test_a_call_cut_in_its_second_micro_batch_is_undone_whole(app: Any) -> None:
    """The cut made deterministic: four sequences run in slots 0-3, the one in slot 1 is
    cancelled, so the decode call over slots 0, 2 and 3 is two micro-batches, and the first
    such call is cut halfway through the second (llama.cpp polls after each graph node), when
    the first has already written slot 0's new cell. Every other output is still exact."""
    backend = await _backend(app, "interrupt-ubatch", slots=4)
    engine = backend.engine
    assert engine is not None
    interrupter = engine._interrupt
    prompts = ["Count from 1 to 200.", "Name a colour.", "List the planets.", "Spell lamp."]
    calls: list[list[Any]] = []  # [prompt chunk?, graph nodes polled] per llama_decode
    cut_at: list[int | None] = [None]
    begin = interrupter.begin

    def counting_begin(rank: tuple[int, float], tokens: int, prefill: bool) -> None:
        calls.append([prefill, 0])
        begin(rank, tokens, prefill)

    def poll() -> bool:
        call = calls[-1]
        call[1] += 1
        if cut_at[0] is not None and not call[0] and call[1] == cut_at[0]:
            cut_at[0] = None  # once
            interrupter._abort = True  # as `request` sets it
        return interrupter._abort

    interrupter.begin = counting_begin  # type: ignore[method-assign]
    interrupter._poll = poll  # type: ignore[method-assign]
    try:
        solo = [await _run(backend, _request(p, BUSY, 40), []) for p in prompts]
        # A lone sequence's decode call is one micro-batch: a node count only a call of two
        # or more reaches is past the first one's end.
        one_micro_batch = max(n for prefill, n in calls if not prefill)
        reqs = [_request(p, BUSY, 40) for p in prompts]
        for r in reqs:
            await backend.prepare(r)
        before = engine.interrupted
        tasks = [asyncio.create_task(_run(backend, r, [])) for r in reqs]
        while engine.running < 4:
            await asyncio.sleep(0.002)
        in_slot_1 = next(s.prompt for s in list(engine._sched.running) if s.slot == 1)
        gap = next(i for i, r in enumerate(reqs) if r.engine_state["tokens"] == in_slot_1)
        cut_at[0] = one_micro_batch + one_micro_batch // 2
        tasks[gap].cancel()
        got = await asyncio.gather(*tasks, return_exceptions=True)

        assert cut_at[0] is None and engine.interrupted == before + 1, str(calls)
        assert [g for i, g in enumerate(got) if i != gap] == solo[:gap] + solo[gap + 1 :]
    finally:
        await backend.aclose()
