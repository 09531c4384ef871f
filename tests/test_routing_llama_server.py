"""Routing to a real model server: llama-cpp-python's OpenAI-compatible server on the SmolLM2
GGUF, on loopback, next to a failing stub replica."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.stub_upstream import StubConfig
from tests.routing_support import chat, deployment, routed, routed_app, stream_text, stubs

pytestmark = pytest.mark.model


async def test_failover_from_a_failing_replica_to_llama_server(
    tmp_path: Path, llama_server: str
) -> None:
    async with stubs(StubConfig(fail_status=500)) as (bad,):
        model = routed(
            "smol",
            [deployment(bad, weight=1000), deployment(llama_server, weight=0.001)],
            routing={"retries": 2, "backoff_base": 0.001},
        )
        async with routed_app(tmp_path, [model]) as r:
            text, _ = await stream_text(r, "smol", max_tokens=8, temperature=0)
            resp = await chat(r, "smol", temperature=0)
    assert bad.stats.requests >= 1  # the stub was tried first and failed
    assert text.strip() and resp.choices[0].message.content
    assert [rec.status for rec in r.records] == [200, 200]
    # llama-cpp-python's server sends no usage chunk when streaming: completion tokens are
    # counted from the chunks (its prompt tokens are unknown to us, recorded as 0)
    assert all(rec.completion_tokens > 0 for rec in r.records)


async def test_rate_limited_upstream_falls_back_to_llama_server(
    tmp_path: Path, llama_server: str
) -> None:
    async with stubs(StubConfig(fail_status=429, retry_after="60")) as (limited,):
        models = [
            routed("cloud", [deployment(limited)], fallbacks=["smol"]),
            routed("smol", [deployment(llama_server)]),
        ]
        async with routed_app(tmp_path, models) as r:
            text, chunks = await stream_text(r, "cloud", max_tokens=8, temperature=0)
    assert text.strip() and chunks[0].model == "smol"
    assert limited.stats.requests == 1
    assert [(rec.model, rec.status) for rec in r.records] == [("smol", 200)]
