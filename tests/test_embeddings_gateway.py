"""What applies to completions applies to /v1/embeddings: API key scopes, tier gating, request
and token limits (tokens = input tokens), the usage ledger, Prometheus metrics, the Batch API,
and the per-input cache on the real Redis.

An app with authentication on, an embedding model served by a stub upstream on loopback
(bench/stub_upstream.py), the official openai SDK and httpx as clients."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from sqlalchemy import select

from bench.stub_upstream import StubConfig, StubUpstream, stub_embedding
from llm_api.core import metrics
from llm_api.core.rate_limits import TierLimits
from llm_api.db.tables import UsageRecord
from llm_api.services.auth import api_keys
from tests.conftest import create_account, require_service
from tests.routing_support import Routed, client_for, routed_app, stubs


def emb(model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "backend": "openai",
        "kind": "embedding",
        "base_url": url,
        "concurrency": 16,
        **extra,
    }


@asynccontextmanager
async def http_for(r: Routed) -> AsyncIterator[httpx.AsyncClient]:
    """httpx on the app, sending whatever credentials a request carries (Routed.http drops
    them: it is for auth-disabled apps)."""
    transport = httpx.ASGITransport(app=r.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield http


@asynccontextmanager
async def gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[StubUpstream, Routed]]:
    """Auth on; `emb` (free) and `emb-paid` (paid) on one stub upstream."""
    async with stubs(StubConfig()) as [stub]:
        models = [emb("emb", stub.base_url), emb("emb-paid", stub.base_url, tier="paid")]
        async with routed_app(tmp_path, models, auth_enabled=True, **settings) as r:
            yield stub, r


async def test_keys_scopes_and_tiers(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (stub, r):
        free = await create_account(r.app)
        paid = await create_account(r.app, tier="paid")
        state = r.app.state.llm_api
        async with state.db.sessions.begin() as db:
            _, keys_only = await api_keys.create_key(db, free.user_id, "keys", ["keys"])
        body = {"model": "emb", "input": "hello"}
        async with http_for(r) as http:
            # No credentials: 401, the OpenAI error object.
            no_key = await http.post("/v1/embeddings", json=body)
            assert no_key.status_code == 401
            # A key without the `inference` scope: 403 naming it.
            wrong = await http.post(
                "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {keys_only}"}
            )
        assert wrong.status_code == 403 and "Missing scope: inference" in wrong.text
        async with client_for(r.app, free.api_key) as sdk:
            ok = await sdk.embeddings.create(model="emb", input="hello")
            assert len(ok.data) == 1
            with pytest.raises(openai.APIStatusError) as refused:
                await sdk.embeddings.create(model="emb-paid", input="hello")
            assert refused.value.status_code == 402
        async with client_for(r.app, paid.api_key) as sdk:
            assert len((await sdk.embeddings.create(model="emb-paid", input="hi")).data) == 1
    assert stub.stats.requests == 2  # the refused requests never reached the upstream


async def test_request_and_token_limits_count_input_tokens(tmp_path: Path) -> None:
    tiers = {"free": TierLimits(requests_per_minute=3, tokens_per_minute=60)}
    async with (
        AsyncExitStack() as stack,
        gateway(tmp_path, rate_limit_enabled=True, rate_limit_tiers=tiers) as (stub, r),
    ):
        acct = await create_account(r.app)
        headers = acct.headers
        http = await stack.enter_async_context(http_for(r))
        short = {"model": "emb", "input": ["one two three", "four five"]}
        first = await http.post("/v1/embeddings", json=short, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["prompt_tokens"] == 5
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        # Reserved by estimate (1 token per 3 characters) and settled to the 5 input tokens.
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 60
        # 300 characters: ~100 tokens estimated, more than the 60 TPM: 429 before any work.
        big = await http.post(
            "/v1/embeddings", json={"model": "emb", "input": "x" * 300}, headers=headers
        )
        assert big.status_code == 429, big.text
        assert "tokens per minute" in big.json()["error"]["message"]
        second = await http.post("/v1/embeddings", json=short, headers=headers)
        assert second.status_code == 200  # a cache hit still counts as a request
        third = await http.post("/v1/embeddings", json=short, headers=headers)
        assert third.status_code == 200
        fourth = await http.post("/v1/embeddings", json=short, headers=headers)
        assert fourth.status_code == 429
        assert "requests per minute" in fourth.json()["error"]["message"]
    assert stub.stats.requests == 1  # then the per-input cache answered


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_usage_ledger_and_metrics(tmp_path: Path, database: str) -> None:
    extra: dict[str, Any] = {}
    async with _database(database) as url:
        if url is not None:
            extra = {"database_url": url, "db_auto_migrate": True}
        async with gateway(tmp_path, **extra) as (stub, r):
            acct = await create_account(r.app)
            inputs_before = metrics.EMBEDDING_INPUTS.labels("emb")._value.get()
            tokens_before = metrics.PROMPT_TOKENS.labels("emb")._value.get()
            ok_before = metrics.REQUESTS.labels("emb", "stop")._value.get()
            usage = []
            async with client_for(r.app, acct.api_key) as sdk:
                for text in (["a b c", "d e"], ["f g h i"], ["a b c"]):
                    resp = await sdk.embeddings.create(model="emb", input=text)
                    usage.append(resp.usage.prompt_tokens)
            state = r.app.state.llm_api
            assert await state.usage.flusher.flush_once()
            async with state.db.sessions() as s:
                rows = list(await s.scalars(select(UsageRecord).filter_by(user_id=acct.user_id)))
            admin = await create_account(r.app, role="admin")
            async with http_for(r) as http:
                report = (await http.get("/v1/usage", headers=acct.headers)).json()
                scraped = (await http.get("/metrics", headers=admin.headers)).text
    assert len(rows) == 3 and {row.endpoint for row in rows} == {"embeddings"}
    # The upstream's counts (words for this stub); a cached input keeps its share of the
    # request it was computed in (the upstream reports one total per request).
    assert usage[:2] == [5, 4] and 1 <= usage[2] <= 5
    assert sorted(row.prompt_tokens for row in rows) == sorted(usage)
    assert all(row.completion_tokens == 0 and row.status == 200 for row in rows)
    assert [row.cache_hit for row in rows] == [False, False, True]
    assert report["totals"]["requests"] == 3
    assert report["totals"]["prompt_tokens"] == sum(usage)
    assert metrics.EMBEDDING_INPUTS.labels("emb")._value.get() - inputs_before == 4
    assert metrics.PROMPT_TOKENS.labels("emb")._value.get() - tokens_before == sum(usage)
    assert metrics.REQUESTS.labels("emb", "stop")._value.get() - ok_before == 3
    assert 'llm_api:embedding_inputs_total{model_name="emb"}' in scraped


@asynccontextmanager
async def _database(kind: str) -> AsyncIterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    from tests.conftest import postgres_database

    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with postgres_database() as url:
        yield url


async def test_batch_api_runs_embedding_lines(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (stub, r):
        acct = await create_account(r.app)
        texts = [f"document number {i}" for i in range(5)]
        lines = [
            {
                "custom_id": f"e-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "emb", "input": text, "encoding_format": "float"},
            }
            for i, text in enumerate(texts)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        async with client_for(r.app, acct.api_key) as sdk:
            uploaded = await sdk.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            )
            deadline = time.monotonic() + 60
            while (done := await sdk.batches.retrieve(batch.id)).status not in (
                "completed",
                "failed",
            ):
                assert time.monotonic() < deadline, done
                await asyncio.sleep(0.2)
            assert done.status == "completed", done
            assert done.output_file_id
            content = (await sdk.files.content(done.output_file_id)).read()
        state = r.app.state.llm_api
        assert await state.usage.flusher.flush_once()
        async with state.db.sessions() as s:
            rows = list(await s.scalars(select(UsageRecord).filter_by(batch_id=batch.id)))
    results = {json.loads(x)["custom_id"]: json.loads(x) for x in content.splitlines()}
    assert sorted(results) == [f"e-{i}" for i in range(5)]
    for i, text in enumerate(texts):
        body = results[f"e-{i}"]["response"]["body"]
        assert body["object"] == "list" and body["model"] == "emb"
        assert np.allclose(body["data"][0]["embedding"], stub_embedding(text, 64), atol=1e-6)
    assert len(rows) == 5 and {row.endpoint for row in rows} == {"embeddings"}


@pytest.mark.redis
async def test_per_input_cache_on_redis_is_shared_across_processes(tmp_path: Path) -> None:
    """Two app instances on one Redis (as two workers or replicas): the second computes only
    the inputs the first has not, and a different tenant shares nothing."""
    require_service("Redis", "127.0.0.1", 6379)
    db = "redis://127.0.0.1:6379/13"
    tag = uuid.uuid4().hex[:8]  # inputs no earlier run has cached
    async with stubs(StubConfig()) as [stub]:
        models = [emb("emb", stub.base_url)]
        settings = {"redis_url": db, "cache_shared": True}
        async with routed_app(tmp_path / "a", models, **settings) as a:
            first = await a.http.post(
                "/v1/embeddings", json={"model": "emb", "input": [f"x {tag}", f"y {tag}"]}
            )
        async with routed_app(tmp_path / "b", models, **settings) as b:
            second = await b.http.post(
                "/v1/embeddings",
                json={"model": "emb", "input": [f"y {tag}", f"z {tag}", f"x {tag}"]},
            )
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "partial"
    assert [body["input"] for body in stub.stats.bodies] == [[f"x {tag}", f"y {tag}"], [f"z {tag}"]]
    assert second.json()["data"][2]["embedding"] == first.json()["data"][0]["embedding"]
