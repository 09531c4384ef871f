"""logprobs / top_logprobs and cached_tokens from the local engines (issue 23, points 4 and 5),
driven through the backends with the real SmolLM2 model: OpenAI's shape and meaning per frame,
the same numbers whether a request runs alone or batched with others, the same in the
one-at-a-time engine, and the count of prompt tokens a reused prefix served."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from llm_api.core.cpus import available_cpus
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.backends.llama_cpp import LlamaCppBackend
from llm_api.services.llm.engine.logprobs import LogprobReader
from llm_api.services.llm.registry import builtin_registry
from llm_api.services.llm.types import (
    Frame,
    GenerationRequest,
    Message,
    SamplingParams,
    TokenLogprob,
)
from tests.conftest import MODEL

pytestmark = pytest.mark.model

PROMPT = "Explain what a compiler does."
OTHERS = [  # different prompt lengths, so their prefill and decodes interleave with ours
    "Hi.",
    "List three facts about the Moon, and say why each matters to people on Earth.",
    " ".join(["Describe a sunrise in the mountains, with colours and sounds."] * 4),
]
LIBRARY = "You answer questions for a public library; be polite, precise and brief."
SYSTEM = " ".join([LIBRARY] * 6)


@dataclass
class Run:
    frames: list[Frame] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(f.text for f in self.frames)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [lp for f in self.frames for lp in f.logprobs or []]

    @property
    def last(self) -> Frame:
        return self.frames[-1]


def _request(
    content: str = PROMPT,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    top: int = 5,
    logprobs: bool = True,
    max_tokens: int = 40,
    stop: list[str] | None = None,
    system: str | None = None,
) -> GenerationRequest:
    messages = [Message("system", system)] if system else []
    return GenerationRequest(
        request_id="lp",
        model=MODEL,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=0.95,
            seed=seed,
            stop=stop or [],
            logprobs=logprobs,
            top_logprobs=top,
        ),
        messages=[*messages, Message("user", content)],
    )


async def _run(backend: Any, req: GenerationRequest) -> Run:
    await backend.prepare(req)
    run = Run()
    async for frame in backend.generate(req):
        run.frames.append(frame)
    assert run.last.finish_reason in ("stop", "length")
    return run


async def _start(config_update: dict[str, Any]) -> LlamaBatchedBackend:
    config = builtin_registry().models[0].model_copy(update=config_update)
    backend = LlamaBatchedBackend(config, threads=available_cpus())
    await backend.start(warmup=False)
    return backend


@pytest.fixture(scope="module")
async def batched() -> AsyncIterator[LlamaBatchedBackend]:
    backend = await _start({"id": "logprobs-batched", "slots": 4})
    yield backend
    await backend.aclose()


def _check_shape(run: Run, top: int, greedy: bool) -> None:
    lps = run.logprobs
    # One entry per completion token, each token in exactly one frame.
    assert len(lps) == run.last.completion_tokens > 0
    for lp in lps:
        assert lp.logprob <= 0.0
        assert lp.bytes is not None and bytes(lp.bytes).decode("utf-8", "backslashreplace") == (
            lp.token
        )
        alts = lp.top_logprobs
        assert len(alts) == top
        values = [a.logprob for a in alts]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values)
        assert math.fsum(math.exp(v) for v in values) <= 1.0 + 1e-6
        for alt in alts:
            assert alt.bytes is not None
            assert bytes(alt.bytes).decode("utf-8", "backslashreplace") == alt.token
        if top:
            # The sampled token is at least as likely as the least of the top ones, or absent.
            assert lp.logprob <= values[0]
        if greedy and top:
            assert (alts[0].token, alts[0].logprob, alts[0].bytes) == (
                lp.token,
                lp.logprob,
                lp.bytes,
            )


async def test_logprobs_have_openai_shape_and_meaning(batched: LlamaBatchedBackend) -> None:
    run = await _run(batched, _request(top=5))
    _check_shape(run, top=5, greedy=True)
    # Without stop strings, each frame's tokens are exactly its text: their bytes joined.
    for frame in run.frames:
        joined = b"".join(bytes(lp.bytes or []) for lp in frame.logprobs or [])
        assert joined.decode("utf-8") == frame.text
    seeded = await _run(batched, _request(temperature=0.9, seed=3, top=20))
    _check_shape(seeded, top=20, greedy=False)


async def test_top_logprobs_zero_and_logprobs_off(batched: LlamaBatchedBackend) -> None:
    only = await _run(batched, _request(top=0))
    assert only.logprobs and all(lp.top_logprobs == [] for lp in only.logprobs)
    off = await _run(batched, _request(logprobs=False))
    assert all(f.logprobs is None for f in off.frames)
    assert off.text == only.text


async def test_every_token_keeps_its_logprob_when_a_stop_string_cuts_the_text(
    batched: LlamaBatchedBackend,
) -> None:
    full = await _run(batched, _request(max_tokens=40))
    words = full.text.split()
    assert len(words) > 4
    stop = " " + words[3]
    cut = await _run(batched, _request(max_tokens=40, stop=[stop]))
    assert cut.last.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    # Tokens up to and including the one that completed the stop string, as counted.
    n = cut.last.completion_tokens
    assert n is not None and len(cut.logprobs) == n
    assert cut.logprobs == full.logprobs[:n]


async def test_logprobs_are_the_models_not_the_samplers(batched: LlamaBatchedBackend) -> None:
    """Raw-model logprobs: temperature does not change the first step's distribution."""
    greedy = await _run(batched, _request(top=10, max_tokens=2))
    hot = await _run(batched, _request(temperature=1.5, seed=11, top=10, max_tokens=2))
    assert greedy.logprobs[0].top_logprobs == hot.logprobs[0].top_logprobs
    sampled = hot.logprobs[0]
    for alt in greedy.logprobs[0].top_logprobs:
        if alt.token == sampled.token:
            assert alt.logprob == sampled.logprob


@pytest.mark.parametrize(
    ("temperature", "seed"), [(0.0, None), (0.8, 42)], ids=["greedy", "seeded"]
)
async def test_same_tokens_and_logprobs_alone_and_batched(
    batched: LlamaBatchedBackend, temperature: float, seed: int | None
) -> None:
    engine = batched.engine
    assert engine is not None
    alone = await _run(batched, _request(temperature=temperature, seed=seed, top=20))
    assert engine.running == 0

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        others = [
            _request(OTHERS[0], temperature=0.7, seed=1, top=3, max_tokens=60),
            _request(OTHERS[1], logprobs=False, max_tokens=60),
            _request(OTHERS[2], temperature=1.1, seed=9, top=20, max_tokens=60),
        ]
        together = await asyncio.gather(
            *(_run(batched, r) for r in others),
            _run(batched, _request(temperature=temperature, seed=seed, top=20)),
        )
    finally:
        watcher.cancel()
    assert peak == 4, "the four requests shared the engine's batches"
    batched_run = together[-1]
    assert batched_run.text == alone.text
    # Exact: each row's logits are computed independently of the batch's other rows.
    assert batched_run.logprobs == alone.logprobs
    # Frame by frame too: the same tokens leave in the same frames.
    assert [(f.text, f.logprobs) for f in batched_run.frames] == [
        (f.text, f.logprobs) for f in alone.frames
    ]


async def test_the_one_at_a_time_engine_reports_the_same_logprobs(
    batched: LlamaBatchedBackend,
) -> None:
    config = builtin_registry().models[0].model_copy(update={"engine": "simple"})
    simple = LlamaCppBackend(config, threads=available_cpus())
    await simple.start(warmup=False)
    try:
        for temperature, seed in ((0.0, None), (0.8, 42)):
            want = await _run(batched, _request(temperature=temperature, seed=seed, top=5))
            got = await _run(simple, _request(temperature=temperature, seed=seed, top=5))
            assert got.text == want.text
            assert got.logprobs == want.logprobs
            _check_shape(got, top=5, greedy=temperature == 0.0)
            assert got.last.cached_tokens == 0  # it evaluates every prompt whole
    finally:
        await simple.aclose()


def test_a_token_that_is_part_of_a_character_shows_its_bytes(
    batched: LlamaBatchedBackend,
) -> None:
    """A token that is not valid UTF-8 alone (byte-level BPE pieces of multi-byte characters)
    is written with `\\xNN` escapes in `token`; `bytes` has the raw bytes."""
    model = batched._model
    assert model is not None
    n_vocab = model.n_vocab()

    def token_bytes(t: int) -> bytes:
        return bytes(model.detokenize([t], special=False))

    partial = next(
        t
        for t in range(n_vocab)
        if (raw := token_bytes(t)) and _invalid_utf8(raw) and raw.isascii() is False
    )
    reader = LogprobReader(n_vocab, token_bytes)
    logits = np.zeros(n_vocab, dtype=np.float32)
    logits[partial] = 5.0
    lp = reader.from_logits(logits, partial, 2)
    raw = token_bytes(partial)
    assert lp.bytes == list(raw)
    assert "\\x" in lp.token and lp.token == raw.decode("utf-8", "backslashreplace")
    assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == lp.logprob
    lse = math.log(math.exp(5.0) + (n_vocab - 1))
    assert lp.logprob == pytest.approx(5.0 - lse, abs=1e-6)
    # Equal logits: the lowest token id first.
    assert lp.top_logprobs[1].logprob == pytest.approx(-lse, abs=1e-6)
    assert lp.top_logprobs[1].bytes == list(token_bytes(0 if partial != 0 else 1))


@pytest.mark.parametrize("n_vocab", [49152, 1000, 257, 7])
def test_top_logprobs_are_those_of_a_full_sort(n_vocab: int) -> None:
    """The block search finds exactly the k largest logits, ties by token id, and the
    log-sum-exp matches a float64 one, on many random and tie-heavy rows."""
    rng = np.random.default_rng(n_vocab)
    reader = LogprobReader(n_vocab, lambda t: str(t).encode())
    for trial in range(60):
        logits = (rng.standard_normal(n_vocab) * rng.uniform(0.1, 12)).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)  # many equal logits, some at the k-th place
        token = int(rng.integers(n_vocab))
        wide = logits.astype(np.float64)
        lse = float(wide.max() + np.log(np.exp(wide - wide.max()).sum()))
        for k in (1, 5, 20):
            got = reader.from_logits(logits, token, k)
            want = np.lexsort((np.arange(n_vocab), -logits))[: min(k, n_vocab)]
            assert [int(a.token) for a in got.top_logprobs] == want.tolist()
            assert got.logprob == pytest.approx(wide[token] - lse, abs=1e-5)


def _invalid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("prefix_cache", [True, False])
async def test_cached_tokens_count_the_reused_prefix(prefix_cache: bool) -> None:
    backend = await _start(
        {"id": f"logprobs-prefix-{prefix_cache}", "slots": 2, "prefix_cache": prefix_cache}
    )
    engine = backend.engine
    assert engine is not None
    try:
        first = await _run(backend, _request("Where are the atlases?", system=SYSTEM))
        assert first.last.cached_tokens == 0
        before = engine.prompt_tokens_reused
        second_req = _request("When do you open on Sundays?", system=SYSTEM)
        second = await _run(backend, second_req)
        reused = engine.prompt_tokens_reused - before
        assert second.last.cached_tokens == reused
        assert second.last.prompt_tokens == len(second_req.engine_state["tokens"])
        if prefix_cache:
            # The system prompt (over 90 shared tokens), less the 64 rows a cold run tiles.
            assert reused >= 40
        else:
            assert reused == 0
        # The final frame carries it, and the first one too (for a reader that stops early).
        assert second.frames[0].cached_tokens == reused
        assert all(f.cached_tokens is None for f in second.frames[1:-1])
    finally:
        await backend.aclose()
