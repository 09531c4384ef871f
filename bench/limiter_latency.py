"""Latency the rate limiter adds per request: `python -m bench.limiter_latency [--redis URL]`.

In-process, closed loop. For each backend (none, memory, Redis) it times what a completion pays
on its path: `admit_completion` (one Lua script on Redis: user RPM/TPM/TPD/concurrency and the
client IP's RPM/TPM/concurrency, 7 limits) and, separately, the settlement the observer starts
when the request ends (off the response path on Redis: a task). Concurrency 1 and 32 (requests
in flight sharing the event loop). Prints p50/p99 in microseconds, 3 repeats each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

from llm_api.core.config import Settings
from llm_api.services.llm.types import CompletionRecord, RequestContext
from llm_api.services.rate_limit.limiter import RateLimiter, build_rate_limiter
from llm_api.services.redis_pool import SharedRedis


def _settings(redis_url: str | None, prefix: str) -> Settings:
    return Settings(
        environment="test",
        jwt_secret="bench-" + "x" * 40,
        data_dir=Path("/tmp"),  # noqa: S108 - unused by the limiter
        rate_limit_key_prefix=prefix,
        redis_url=redis_url,
        rate_limit_tiers={  # high enough that nothing is refused during the run
            "free": {
                "requests_per_minute": 10**9,
                "tokens_per_minute": 10**12,
                "tokens_per_day": 10**12,
                "concurrent_requests": 10**6,
            },
            "ip": {
                "requests_per_minute": 10**9,
                "tokens_per_minute": 10**12,
                "concurrent_requests": 10**6,
            },
        },
    )


def _record(ctx: RequestContext) -> CompletionRecord:
    return CompletionRecord(
        request_id=ctx.request_id, model="m", endpoint="chat", user_id=ctx.user_id,
        key_id=ctx.key_id, batch_id=None, prompt_tokens=30, completion_tokens=40,
        finish_reason="stop", status=200, cache_hit=False, cancelled=False, ttft_ms=None,
        latency_ms=1.0, queue_ms=0.0, stream=False,
    )  # fmt: skip


async def _one(limiter: RateLimiter | None, admit_us: list[float], total_us: list[float]) -> None:
    ctx = RequestContext(
        request_id=uuid.uuid4().hex, user_id="u-bench", key_id="k-bench", client_ip="10.0.0.1"
    )
    t0 = time.perf_counter()
    if limiter is not None:
        await limiter.admit_completion(ctx, 30 + 256)
    t1 = time.perf_counter()
    if limiter is not None:
        limiter.on_completion(_record(ctx))
        if limiter._tasks:  # Redis: wait for the settlement task to measure its cost too
            await asyncio.gather(*list(limiter._tasks))
    t2 = time.perf_counter()
    admit_us.append((t1 - t0) * 1e6)
    total_us.append((t2 - t0) * 1e6)


async def _run(limiter: RateLimiter | None, n: int, concurrency: int) -> tuple[list[float], ...]:
    admit_us: list[float] = []
    total_us: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def guarded() -> None:
        async with sem:
            await _one(limiter, admit_us, total_us)

    await asyncio.gather(*(guarded() for _ in range(n)))
    return admit_us, total_us


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main_async(redis_url: str | None, n: int, repeats: int) -> None:
    backends: list[tuple[str, str | None]] = [("none", None), ("memory", None)]
    if redis_url:
        backends.append(("redis", redis_url))
    print(f"{'backend':8} {'conc':>4} {'rep':>3}  admit p50/p99 µs   admit+settle p50/p99 µs")
    for concurrency in (1, 32):
        for name, url in backends:
            prefix = f"bench:{uuid.uuid4().hex[:8]}"
            settings = _settings(url, prefix)
            redis = SharedRedis.from_settings(settings)
            limiter = None if name == "none" else build_rate_limiter(settings, redis)
            if limiter is not None:
                await limiter.start()
            await _run(limiter, 500, concurrency)  # warm-up: connections, script load
            for rep in range(repeats):
                admit, total = await _run(limiter, n, concurrency)
                print(
                    f"{name:8} {concurrency:>4} {rep + 1:>3}  "
                    f"{_pct(admit, 50):8.0f} / {_pct(admit, 99):6.0f}     "
                    f"{_pct(total, 50):8.0f} / {_pct(total, 99):6.0f}"
                )
            if limiter is not None:
                if name == "redis":
                    store = limiter.store
                    keys = [k async for k in store.redis.scan_iter(match=f"{{{prefix}}}:*")]  # type: ignore[attr-defined]
                    if keys:
                        await store.redis.delete(*keys)  # type: ignore[attr-defined]
                await limiter.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("-n", type=int, default=5000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.redis or None, args.n, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
