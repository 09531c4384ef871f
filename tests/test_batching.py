"""Continuous batching of the local model (issue 8), functional (not timed): many streams at once,
per-request parameters inside one batch, greedy output unchanged by concurrency, equality with
the one-at-a-time engine, slots freed on disconnect, and requests beyond the KV budget queueing.

Two apps: the session `app` (the built-in SmolLM2 entry: batched, 16 slots) and a small one here
whose model has 2 slots, so that "full" is easy to reach."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llm_api.core import metrics
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.backends.llama_cpp import LlamaCppBackend
from llm_api.services.llm.registry import builtin_registry
from llm_api.services.llm.types import GenerationRequest, Message, RequestContext, SamplingParams
from tests.conftest import MODEL, create_account, running_app
from tests.conftest import test_settings as make_settings

pytestmark = pytest.mark.model

SMALL = "smollm2-2-slots"
PROMPTS = [
    "Write a short poem about the sea.",
    "List three facts about the Moon.",
    "Explain what a compiler does.",
    "Describe a sunrise in the mountains.",
]


def _engine(app: Any, model: str = MODEL) -> Any:
    backend = app.state.llm_api.llm.backends[model]
    assert isinstance(backend, LlamaBatchedBackend), (
        "the built-in model must use the batched engine"
    )
    return backend.engine


@pytest.fixture(scope="module")
async def small_app(session_tmp: Path) -> AsyncIterator[Any]:
    tmp = session_tmp / "batching"
    tmp.mkdir(parents=True, exist_ok=True)
    entry = builtin_registry().models[0].model_dump(mode="json", exclude_none=True)
    entry.pop("concurrency")
    # n_batch 64: a prompt of a few hundred tokens needs several steps of prefill.
    entry.update(id=SMALL, slots=2, context_length=1024, max_queue=16, n_batch=64)
    registry = tmp / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry]}))
    async with running_app(make_settings(tmp, models_file=registry)) as application:
        yield application


@pytest.fixture(scope="module")
async def small_client(small_app: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    import httpx

    account = await create_account(small_app)
    transport = httpx.ASGITransport(app=small_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield openai.AsyncOpenAI(
            base_url="http://testserver/v1",
            api_key=account.api_key,
            http_client=http,
            max_retries=0,
        )


async def _stream(client: openai.AsyncOpenAI, model: str = MODEL, **kw: Any) -> dict[str, Any]:
    """One streamed chat completion: its text, finish_reason and usage."""
    content = kw.pop("content", PROMPTS[0])
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"text": "".join(text), "finish": finish, "usage": usage}


async def test_sixteen_concurrent_streams_complete_with_correct_usage(
    client: openai.AsyncOpenAI, app: Any
) -> None:
    engine = _engine(app)
    solo = await _stream(client, content=PROMPTS[1], max_tokens=12, temperature=0)
    steps_before = engine.steps
    results = await asyncio.gather(
        *(
            _stream(client, content=PROMPTS[i % 4], max_tokens=12, temperature=0.8, seed=i)
            for i in range(16)
        )
    )
    steps = engine.steps - steps_before
    total = 0
    for i, r in enumerate(results):
        assert r["finish"] in ("stop", "length")
        u = r["usage"]
        assert u is not None and u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert 1 <= u.completion_tokens <= 12
        if r["finish"] == "length":
            assert u.completion_tokens == 12
        if i % 4 == 1:  # same prompt as `solo`: same prompt token count
            assert u.prompt_tokens == solo["usage"].prompt_tokens
        total += u.completion_tokens
    # Batched: far fewer decode steps than tokens (one at a time would need one step per token).
    assert steps < total / 2, (steps, total)


async def test_per_request_parameters_hold_inside_one_batch(client: openai.AsyncOpenAI) -> None:
    """max_tokens, stop and json_schema are per sequence, while others share the batch."""
    # A stop string that the greedy continuation of PROMPTS[2] is known to contain.
    free = await _stream(client, content=PROMPTS[2], max_tokens=40, temperature=0)
    words = free["text"].split()
    assert len(words) > 8, free
    stop = " " + words[6]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    short, stopped, unstopped, structured, *others = await asyncio.gather(
        _stream(client, content=PROMPTS[0], max_tokens=5, temperature=0.7),
        _stream(client, content=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop]),
        _stream(client, content=PROMPTS[2], max_tokens=40, temperature=0),
        _stream(
            client,
            content="Give a person's name and age as JSON.",
            max_tokens=60,
            temperature=0.7,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema},
            },
        ),
        *(_stream(client, content=p, max_tokens=40, temperature=0.7) for p in PROMPTS),
    )
    assert short["finish"] == "length" and short["usage"].completion_tokens == 5
    assert stopped["finish"] == "stop"
    assert stop not in stopped["text"]
    assert stopped["usage"].completion_tokens < 40
    assert stop in unstopped["text"], "the stop string only ends its own stream"
    assert unstopped["text"].startswith(stopped["text"])
    data = json.loads(structured["text"])
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    for r in others:
        assert r["finish"] in ("stop", "length") and r["usage"].completion_tokens >= 1


async def test_greedy_output_identical_with_and_without_concurrency(
    client: openai.AsyncOpenAI,
) -> None:
    solo = [await _stream(client, content=p, max_tokens=24, temperature=0) for p in PROMPTS]
    together = await asyncio.gather(
        *(_stream(client, content=p, max_tokens=24, temperature=0) for p in PROMPTS * 2)
    )
    for i, r in enumerate(together):
        assert r["text"] == solo[i % 4]["text"], i


def _request(temperature: float, seed: int | None, content: str) -> GenerationRequest:
    return GenerationRequest(
        request_id="eq",
        model=MODEL,
        params=SamplingParams(max_tokens=48, temperature=temperature, top_p=0.95, seed=seed),
        messages=[Message("user", content)],
    )


async def _collect(backend: Any, req: GenerationRequest) -> tuple[str, str | None, int | None]:
    await backend.prepare(req)
    parts, finish, n = [], None, None
    async for chunk in backend.generate(req):
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            finish, n = chunk.finish_reason, chunk.completion_tokens
    return "".join(parts), finish, n


async def _simple_backend(threads: int) -> LlamaCppBackend:
    """The one-at-a-time engine on the same model: a cold run of every prompt."""
    config = builtin_registry().models[0].model_copy(update={"engine": "simple"})
    simple = LlamaCppBackend(config, threads=threads)
    await simple.start(warmup=False)
    return simple


async def test_one_sequence_matches_the_unbatched_engine(app: Any) -> None:
    """Alone in the batch, a sequence decodes exactly as llama-cpp-python's Llama.generate does
    (same sampler chain, same seed), greedy and seeded."""
    batched = app.state.llm_api.llm.backends[MODEL]
    simple = await _simple_backend(batched._threads)
    try:
        for temperature, seed, content in (
            (0.0, None, PROMPTS[0]),
            (0.8, 42, PROMPTS[1]),
            (1.2, 7, PROMPTS[3]),
        ):
            expected = await _collect(simple, _request(temperature, seed, content))
            got = await _collect(batched, _request(temperature, seed, content))
            assert got == expected, (temperature, seed)
    finally:
        await simple.aclose()


LIBRARY = "You answer questions for a public library; be polite, precise and brief."
SYSTEM = " ".join([LIBRARY] * 6)


def _with_system(
    content: str,
    system: str = SYSTEM,
    temperature: float = 0.0,
    seed: int | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id="prefix",
        model=MODEL,
        params=SamplingParams(max_tokens=24, temperature=temperature, top_p=0.95, seed=seed),
        messages=[Message("system", system), Message("user", content)],
    )


def _shared(first: GenerationRequest, second: GenerationRequest) -> int:
    """Leading prompt tokens two prepared requests have in common."""
    a, b = first.engine_state["tokens"], second.engine_state["tokens"]
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


async def _prefix_backend(app: Any, name: str, prefix_cache: bool) -> LlamaBatchedBackend:
    threads = app.state.llm_api.llm.backends[MODEL]._threads
    update = {"id": name, "slots": 2, "prefix_cache": prefix_cache}
    config = builtin_registry().models[0].model_copy(update=update)
    backend = LlamaBatchedBackend(config, threads=threads)
    await backend.start(warmup=False)
    return backend


@pytest.mark.parametrize("prefix_cache", [True, False])
async def test_shared_system_prompt_is_evaluated_once(prefix_cache: bool, app: Any) -> None:
    """With `prefix_cache` on (the default), a request that shares a long system prompt with
    the one before it takes that prefix from the freed slot's KV cache instead of evaluating
    it again (and the Prometheus counters say so); off, every prompt is evaluated whole."""
    backend = await _prefix_backend(app, f"prefix-{prefix_cache}", prefix_cache)
    engine = backend.engine
    assert engine is not None
    hits = metrics.PREFIX_CACHE_HITS.labels(backend.config.id)
    try:
        first_req = _with_system("Where are the atlases?")
        first = await _collect(backend, first_req)
        assert engine.prompt_tokens_reused == 0  # nothing cached yet
        second_req = _with_system("When do you open on Sundays?")
        second = await _collect(backend, second_req)
        reused = engine.prompt_tokens_reused
        assert first[1] in ("stop", "length") and second[1] in ("stop", "length")
        assert second[0].strip()  # it still answers
        a, b = first_req.engine_state["tokens"], second_req.engine_state["tokens"]
        shared = _shared(first_req, second_req)
        assert shared >= 90  # the template's header and the system prompt
        if prefix_cache:
            # The common prefix, except that at least 64 rows are evaluated: a cold run computes
            # this prompt (over 64 tokens) with llama.cpp's tiled kernel, which takes 64 rows.
            assert len(b) > 64
            assert reused == min(shared, len(b) - 64) > 0
        else:
            assert reused == 0
        assert engine.prompt_tokens == len(a) + len(b)  # both prompts admitted and counted
        assert hits._value.get() == reused
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    "system",
    [LIBRARY, SYSTEM, " ".join([LIBRARY] * 20)],
    ids=["36-tokens", "111-tokens", "321-tokens"],
)
async def test_a_reused_prefix_gives_the_cold_output(system: str, app: Any) -> None:
    """The answer to a prompt whose prefix comes from the KV cache is the one a cold run
    gives (the one-at-a-time engine evaluates every prompt from scratch), greedy and seeded:
    reuse stops where llama.cpp would compute a token with another kernel than a cold run."""
    backend = await _prefix_backend(app, "prefix-exact", True)
    engine = backend.engine
    assert engine is not None
    simple = await _simple_backend(backend._threads)
    try:
        await _collect(backend, _with_system("Where are the atlases?", system))
        for temperature, seed in ((0.0, None), (0.8, 42)):
            before = engine.prompt_tokens_reused
            req = _with_system("When do you open on Sundays?", system, temperature, seed)
            got = await _collect(backend, req)
            assert engine.prompt_tokens_reused > before, "the prefix came from the cache"
            cold = _with_system("When do you open on Sundays?", system, temperature, seed)
            assert got == await _collect(simple, cold), (temperature, seed)
    finally:
        await simple.aclose()
        await backend.aclose()


@pytest.mark.parametrize(
    ("temperature", "seed"), [(0.0, None), (0.8, 42)], ids=["greedy", "seeded"]
)
@pytest.mark.parametrize(
    "system",
    [LIBRARY, SYSTEM, " ".join([LIBRARY] * 20)],
    ids=["36-tokens", "111-tokens", "321-tokens"],
)
async def test_a_prefix_copied_from_another_slot_gives_the_cold_output(
    system: str, temperature: float, seed: int | None, app: Any
) -> None:
    """A new sequence takes the lowest free slot; when another slot holds a longer usable
    prefix, its KV stream is copied over first, and the answer is still the cold run's.
    (Alone in the engine: past position 256 a lone sequence decodes with another kernel than
    two together, so only a lone request is comparable with the one-at-a-time engine.)"""
    threads = app.state.llm_api.llm.backends[MODEL]._threads
    config = builtin_registry().models[0].model_copy(update={"id": "prefix-copy", "slots": 3})
    backend = LlamaBatchedBackend(config, threads=threads)
    await backend.start(warmup=False)
    engine = backend.engine
    assert engine is not None
    simple = await _simple_backend(threads)
    busy: list[asyncio.Task[Any]] = []
    try:
        # Slots 0 and 1 busy with unrelated streams while the system prompt lands in slot 2.
        long = [_request(0.0, None, "Tell me a long story about a dragon.") for _ in (0, 1)]
        for req in long:
            req.params.max_tokens = 2000
        busy = [asyncio.create_task(_collect(backend, req)) for req in long]
        for _ in range(250):
            if engine.running == 2:
                break
            await asyncio.sleep(0.02)
        assert engine.running == 2
        primer = _with_system("Where are the atlases?", system)
        await _collect(backend, primer)
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        # The request lands on freed slot 0, whose cache shares only the template's first
        # tokens with it; slot 2 holds the system prompt.
        before, copies = engine.prompt_tokens_reused, engine.kv_copies
        req = _with_system("When do you open?", system, temperature, seed)
        got = await _collect(backend, req)
        assert engine.kv_copies - copies == 1
        # The shared prefix, less the 64 rows a cold run tiles (prompts over 64 tokens).
        shared, n = _shared(primer, req), len(req.engine_state["tokens"])
        expected = min(shared, n - 64) if n > 64 else shared
        assert expected > 0 and engine.prompt_tokens_reused - before == expected
        cold = _with_system("When do you open?", system, temperature, seed)
        assert got == await _collect(simple, cold)
    finally:
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        await simple.aclose()
        await backend.aclose()


async def test_disconnect_frees_its_slot(small_app: Any) -> None:
    """Closing a stream after a few chunks (what Starlette does when the client goes away)
    frees the engine slot and the admission slot; the next requests run at once."""
    service = small_app.state.llm_api.llm
    engine, gate = _engine(small_app, SMALL), service.gates[SMALL]
    req = ChatCompletionRequest.model_validate(
        {
            "model": SMALL,
            "messages": [{"role": "user", "content": PROMPTS[3]}],
            "max_tokens": 500,
            "temperature": 0.8,
            "stream": True,
        }
    )
    serving = small_app.state.llm_api.responses
    streams = [
        (await serving.chat_stream(req, RequestContext(request_id=f"d{i}")))[0] for i in (0, 1)
    ]
    for stream in streams:
        for _ in range(3):
            await anext(stream)
    assert engine.running == 2 and gate.running == 2
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(100):  # the engine frees the slots at its next step
        if engine.running == 0 and gate.running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.running == 0 and gate.running == 0
    short = req.model_copy(update={"max_tokens": 4, "stream": False})
    done = await asyncio.wait_for(
        asyncio.gather(*(serving.chat(short, RequestContext(request_id=f"n{i}")) for i in (0, 1))),
        timeout=60,
    )
    assert all(c.usage.completion_tokens == 4 for c, _ in done)


async def test_requests_beyond_the_kv_budget_wait_instead_of_failing(
    small_app: Any, small_client: openai.AsyncOpenAI
) -> None:
    """2 slots × 1024 tokens of KV: 6 requests at once run 2 at a time, the rest queue."""
    engine, gate = _engine(small_app, SMALL), small_app.state.llm_api.llm.gates[SMALL]
    most_running, most_waiting = 0, 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal most_running, most_waiting
        while not stop.is_set():
            most_running = max(most_running, engine.running)
            most_waiting = max(most_waiting, gate.waiting)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(
                _stream(small_client, SMALL, content=PROMPTS[i % 4], max_tokens=16, temperature=0)
                for i in range(6)
            )
        )
    finally:
        stop.set()
        await watcher
    assert all(r["finish"] in ("stop", "length") for r in results)
    assert most_running == 2
    assert most_waiting >= 1
    assert gate.running == 0 and engine.running == 0


async def test_long_prompt_prefill_does_not_freeze_a_running_stream(small_app: Any) -> None:
    """Prefill is chunked (n_batch 64 per step here) and interleaved with decoding, prompt
    chunks first in each step: while a ~600-token prompt is evaluated over many steps, the
    running stream gets a token in every one of them, and the new sequence decodes in the
    step its prompt ends. Counted in engine calls (`call_log`), not timed."""
    backend = small_app.state.llm_api.llm.backends[SMALL]
    engine = _engine(small_app, SMALL)
    running = _request(0.0, None, "Count from 1 to 500, separated by commas.")
    running.params.max_tokens = 300  # greedy counting: no end of generation before that
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    late = _request(0.0, None, long_prompt + " Summarise this.")
    late.params.max_tokens = 2
    await backend.prepare(late)
    assert late.prompt_tokens is not None and late.prompt_tokens > 500
    seen: list[str] = []
    at_first_token: list[int] = []
    log: list[tuple[int, bool, tuple[tuple[int, int], ...]]] = []

    async def consume_running() -> None:
        async for chunk in backend.generate(running):
            seen.append(chunk.text)
            if at_first_token:
                break

    async def start_late() -> None:
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        engine.call_log = log
        async for _chunk in backend.generate(late):
            if not at_first_token:
                at_first_token.append(len(seen))

    try:
        await asyncio.wait_for(asyncio.gather(consume_running(), start_late()), timeout=120)
    finally:
        engine.call_log = None
    during_prefill = at_first_token[0] - 2
    assert during_prefill >= 5, f"only {during_prefill} tokens while a 600-token prompt ran"

    chunks = [(step, shape[0]) for step, prefill, shape in log if prefill]
    late_slot = chunks[0][1][0]
    assert {slot for _, (slot, _) in chunks} == {late_slot}
    # The whole prompt, bar a reused chat-template header at most, evaluated in chunks.
    assert late.prompt_tokens - 64 < sum(n for _, (_, n) in chunks) <= late.prompt_tokens
    first_step, last_step = chunks[0][0], chunks[-1][0]
    assert last_step - first_step >= 5, "a 600-token prompt in 64-token steps takes many steps"
    by_step: dict[int, list[tuple[bool, tuple[tuple[int, int], ...]]]] = {}
    for step, prefill, shape in log:
        by_step.setdefault(step, []).append((prefill, shape))
    for step in range(first_step, last_step + 1):
        calls = by_step[step]
        kinds = [prefill for prefill, _ in calls]
        # Prompt chunks first, then exactly one decode call, in every step.
        assert kinds == [True] * (len(kinds) - 1) + [False], (step, calls)
        # At most the budget (64) less the running sequences' tokens, plus the overrun a
        # chunk may take to keep the cold run's kernels (< 2 × 64).
        assert sum(n for prefill, shape in calls if prefill for _, n in shape) < 64 + 128
        decoded = {slot for slot, _ in calls[-1][1]}
        assert len(decoded - {late_slot}) == 1, "the running stream decodes in every step"
    # The new sequence's first token is sampled by its last chunk, its second in that step.
    assert late_slot in {slot for slot, _ in by_step[last_step][-1][1]}


async def test_n_choices_decode_together(client: openai.AsyncOpenAI, app: Any) -> None:
    """n choices of one request share decode steps instead of running one after another."""
    engine = _engine(app)
    steps_before = engine.steps
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 50, separated by commas."}],
        max_tokens=16,
        temperature=0,
        n=4,
        extra_headers={"Cache-Control": "no-cache, no-store"},
    )
    steps = engine.steps - steps_before
    assert reply.usage is not None and reply.usage.completion_tokens == 4 * 16
    assert len({c.message.content for c in reply.choices}) == 1  # greedy: the same text four times
    # One after another would need at least 4 × 16 steps; together, 16 plus a few for prefill.
    assert steps <= 16 + 6, steps
