"""Streaming passthrough adds no buffering, proven through the real server (`llm-api serve`,
uvicorn, every middleware) rather than an in-process transport, which buffers by itself: an
upstream that sends three tokens and then goes quiet must have those three tokens reach an
openai SDK client while it is still quiet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import yaml

from bench.stub_upstream import StubConfig
from tests.conftest import start_live_server
from tests.routing_support import deployment, routed, stubs


async def test_tokens_reach_the_client_while_the_upstream_is_quiet(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=10, stall_after=3)) as (stub,):
        models = tmp_path / "models.yaml"
        # The idle timeout is far beyond the test's wait: only forwarding can deliver in time.
        dep = deployment(stub, idle_timeout=120)
        models.write_text(yaml.safe_dump({"models": [routed("m", [dep])]}))
        server = await asyncio.to_thread(
            start_live_server, tmp_path / "srv", {"LLM_API_MODELS_FILE": str(models)}
        )
        try:
            client = openai.AsyncOpenAI(
                base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0
            )
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            texts: list[str] = []
            async with asyncio.timeout(20):
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        texts.append(chunk.choices[0].delta.content)
                    if "".join(texts) == "tok " * 3:  # in one delta or several
                        break
            assert stub.stats.completed == 0  # the upstream is still stalled, mid-stream
            await stream.close()
            await client.close()
        finally:
            await asyncio.to_thread(server.stop)
