"""Every response's usage carries its `cost` (USD), from the model's prices and the tokens it
used, through the official SDKs of each family, streamed and not; the ledger records the same
cost; a cache hit costs nothing."""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from llm_api.services.llm.registry import DEFAULT_EMBEDDING_MODEL_ID
from tests.conftest import MODEL
from tests.money.conftest import CHAT_PRICES, EMBED_PRICES, Priced, nanos_per_token

pytestmark = pytest.mark.model

IN, CACHED, OUT = (nanos_per_token(CHAT_PRICES[k]) for k in ("input", "cached_input", "output"))


def expected(prompt: int, completion: int, cached: int = 0) -> float:
    return ((prompt - cached) * IN + cached * CACHED + completion * OUT) / 1e9


def within(cost: float, prompt: int, completion: int) -> bool:
    return 0 < expected(prompt, completion, cached=prompt) <= cost <= expected(prompt, completion)


def openai_client(p: Priced) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key=p.account.api_key, http_client=p.http,
        max_retries=0,
    )  # fmt: skip


def cached_of(usage: Any) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (details.cached_tokens or 0) if details is not None else 0


def cost_of(usage: Any) -> float:
    extra = usage.model_extra or {}
    assert "cost" in extra, usage
    return float(extra["cost"])


def prompt() -> str:
    return f"Say one word about {uuid.uuid4().hex[:8]}."


async def test_cost_in_usage_of_every_family_and_in_the_ledger(priced: Priced) -> None:
    client = openai_client(priced)
    costs: dict[str, float] = {}
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 0.7}

    chat = await client.chat.completions.create(
        messages=[{"role": "user", "content": prompt()}], **body
    )
    u = chat.usage
    assert u is not None and u.completion_tokens > 0
    assert cost_of(u) == expected(u.prompt_tokens, u.completion_tokens, cached_of(u)) > 0
    costs[chat.id.removeprefix("chatcmpl-")] = cost_of(u)

    stream = await client.chat.completions.create(
        messages=[{"role": "user", "content": prompt()}], stream=True,
        stream_options={"include_usage": True}, **body,
    )  # fmt: skip
    last = None
    async for chunk in stream:
        last = chunk
    assert last is not None and last.usage is not None
    u = last.usage
    assert cost_of(u) == expected(u.prompt_tokens, u.completion_tokens, cached_of(u)) > 0
    costs[last.id.removeprefix("chatcmpl-")] = cost_of(u)

    text = await client.completions.create(prompt=prompt(), **body)
    assert text.usage is not None
    u = text.usage
    assert cost_of(u) == expected(u.prompt_tokens, u.completion_tokens, cached_of(u)) > 0
    costs[text.id.removeprefix("cmpl-")] = cost_of(u)

    emb = await client.embeddings.with_raw_response.create(
        model=DEFAULT_EMBEDDING_MODEL_ID, input=[prompt(), prompt()]
    )
    parsed = emb.parse()
    embed_in = nanos_per_token(EMBED_PRICES["input"])
    assert cost_of(parsed.usage) == parsed.usage.prompt_tokens * embed_in / 1e9 > 0
    costs[emb.headers["x-request-id"]] = cost_of(parsed.usage)

    resp = await client.responses.create(model=MODEL, input=prompt(), max_output_tokens=8)
    assert resp.usage is not None
    ru = resp.usage
    cached = ru.input_tokens_details.cached_tokens
    assert cost_of(ru) == expected(ru.input_tokens, ru.output_tokens, cached) > 0
    costs[resp.id.removeprefix("resp_")] = cost_of(ru)

    events = await client.responses.create(
        model=MODEL, input=prompt(), max_output_tokens=8, stream=True
    )
    done = None
    async for event in events:
        if event.type in ("response.completed", "response.incomplete"):
            done = event.response
    assert done is not None and done.usage is not None
    ru = done.usage
    cached = ru.input_tokens_details.cached_tokens
    assert cost_of(ru) == expected(ru.input_tokens, ru.output_tokens, cached) > 0
    costs[done.id.removeprefix("resp_")] = cost_of(ru)

    transport = httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=priced.app), base_url="http://127.0.0.1"
    )
    claude = anthropic.AsyncAnthropic(
        base_url="http://127.0.0.1", api_key=priced.account.api_key, http_client=transport,
        max_retries=0,
    )  # fmt: skip
    message = await claude.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": prompt()}]
    )
    mu = message.usage
    # Anthropic's usage does not say how much of the prompt a reused prefix served: the cost
    # lies between all of it cached and none of it (and equals the ledger's, below).
    assert within(cost_of(mu), mu.input_tokens, mu.output_tokens)
    costs[message.id.removeprefix("msg_")] = cost_of(mu)

    streamed = await claude.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": prompt()}], stream=True
    )
    delta_usage, message_id = None, ""
    async for ev in streamed:
        if ev.type == "message_start":
            message_id = ev.message.id
        if ev.type == "message_delta":
            delta_usage = ev.usage
    assert delta_usage is not None
    assert within(cost_of(delta_usage), delta_usage.input_tokens or 0, delta_usage.output_tokens)
    costs[message_id.removeprefix("msg_")] = cost_of(delta_usage)
    await transport.aclose()

    # The ledger holds the very cost each client was told, exactly (nano-dollars).
    await priced.flush()
    for request_id, cost in costs.items():
        (record,) = await priced.records(request_id=request_id)
        assert record.cost_nanos == round(cost * 1e9), request_id
        assert record.user_id == priced.account.user_id


async def test_a_cache_hit_costs_nothing(priced: Priced) -> None:
    client = openai_client(priced)
    body: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4, "temperature": 0,
    }  # fmt: skip
    first = await client.chat.completions.with_raw_response.create(**body)
    again = await client.chat.completions.with_raw_response.create(**body)
    assert again.headers["x-cache"] == "hit"
    assert first.parse().usage is not None and cost_of(first.parse().usage) > 0
    hit = again.parse().usage
    assert hit is not None and hit.completion_tokens > 0 and cost_of(hit) == 0.0
    await priced.flush()
    (record,) = await priced.records(request_id=again.headers["x-request-id"])
    assert record.cache_hit and record.cost_nanos == 0


def test_fine_tuning_jobs_are_priced_per_trained_token_from_the_registry(tmp_path: Any) -> None:
    from llm_api.services.fine_tuning.queue import runner_config
    from llm_api.services.llm.registry import load_registry
    from tests.conftest import test_settings
    from tests.core_apps import SMOLLM_GGUF, write_registry

    path = write_registry(
        tmp_path / "models.yaml",
        [
            {
                "id": "priced-base",
                "backend": "llama_cpp",
                "gguf": SMOLLM_GGUF,
                "pricing": {"input": 0.1, "training": 3.25},
            }
        ],
    )
    settings = test_settings(tmp_path, models_file=path)
    prices = runner_config(settings, load_registry(path)).prices
    # 3.25 USD per million trained tokens = 3,250 nano-dollars a token, exactly.
    assert prices["priced-base"].training_cost(1_000) == 3_250_000
    assert prices["priced-base"].cost(10, 0, 0) == 1_000  # inference prices unchanged
