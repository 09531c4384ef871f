"""The load generator: streaming chat completions against any OpenAI-compatible endpoint.

aiohttp rather than httpx: httpx's connection pool caps a client near 300 streaming req/s on
this machine (encode/httpx#3215), which would make the load generator the bottleneck.
Per request it records the send time, every content chunk's arrival, the token count (from the
usage chunk when the server sends one, else the number of content chunks) and any error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestResult:
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    output_tokens: int = 0
    tokens_from_usage: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start


@dataclass
class Workload:
    base_url: str  # ending in /v1
    model: str
    prompt: str
    max_tokens: int = 128
    temperature: float = 0.7
    ignore_eos: bool = False  # llama-server and vLLM accept it; others may reject it
    api_key: str | None = None  # sent as a Bearer token when set
    timeout: float = 600.0

    same_prompt: bool = False  # else each request's message starts with its own number

    def body(self, seed: int) -> dict[str, Any]:
        # A distinct start per request, as distinct users' messages: no server can answer from
        # a cached copy of the whole prompt (llama-server and llama-cpp-python cache prefixes).
        content = self.prompt if self.same_prompt else f"Request {seed}. {self.prompt}"
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


async def one_request(session: aiohttp.ClientSession, w: Workload, seed: int) -> RequestResult:
    res = RequestResult(start=time.perf_counter())
    try:
        async with session.post(
            f"{w.base_url}/chat/completions",
            json=w.body(seed),
            headers={"Authorization": f"Bearer {w.api_key}"} if w.api_key else None,
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            chunks = 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    break
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        res.chunk_times.append(time.perf_counter())
                        chunks += 1
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.output_tokens = int(usage["completion_tokens"])
                    res.tokens_from_usage = True
            if not res.tokens_from_usage:
                res.output_tokens = chunks
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        res.end = time.perf_counter()
    return res


def _session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    # A fresh connection per request: llama-server closes kept-alive connections on its own
    # schedule, and a POST on a connection it just closed fails ("Can not write request body").
    conn = aiohttp.TCPConnector(limit=max(concurrency, 1) + 8, force_close=True)
    return aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout), raise_for_status=False
    )


async def closed_loop(
    w: Workload, concurrency: int, num_requests: int, stagger: float = 0.0
) -> list[RequestResult]:
    """`concurrency` workers, each sending its next request as soon as the last one ends.
    With `stagger`, worker k starts k × stagger / concurrency seconds late: equal-length streams
    that all start together also end together, so every later request arrives in the same burst
    (all prompts prefilled at once); staggering gives the steady arrivals of independent users."""
    results: list[RequestResult] = []
    counter = iter(range(num_requests))

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        await asyncio.sleep(k * stagger / concurrency)
        for i in counter:  # shared iterator: the workers take turns drawing request numbers
            results.append(await one_request(session, w, seed=1000 + i))

    async with _session(concurrency, w.timeout) as session:
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
    return results


async def poisson(
    w: Workload, rate: float, num_requests: int, rng_seed: int = 0
) -> list[RequestResult]:
    """Open loop: requests arrive as a Poisson process of `rate` per second, whatever the
    server's state (arrivals do not wait for earlier requests)."""
    rng = random.Random(rng_seed)
    tasks: list[asyncio.Task[RequestResult]] = []
    async with _session(num_requests, w.timeout) as session:
        for i in range(num_requests):
            tasks.append(asyncio.create_task(one_request(session, w, seed=1000 + i)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))
