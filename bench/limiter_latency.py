"""Latency the rate limiter adds per request: `python -m bench.limiter_latency [--redis URL]`.

In-process, closed loop. For each backend (none, memory, Redis) it times what a completion pays
on its path: `admit_completion` (one Lua script on Redis: user RPM/TPM/TPD/concurrency and the
client IP's RPM/TPM/concurrency, 7 limits) and, separately, the settlement the observer starts
when the request ends (off the response path on Redis: a task). Concurrency 1 and 32 (requests
in flight sharing the event loop). Prints p50/p99 in microseconds, 3 repeats each.

`--budgets` measures what money adds: each backend runs with and without budgets (three on every
request: its key's daily and monthly ones and its team's, charged in the same script as the
token limits), the two
alternating per repeat, and the added p50 is printed at the end.
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
from llm_api.services.money.budgets import BudgetBook, BudgetRule
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
        latency_ms=1.0, queue_ms=0.0, stream=False, cost_nanos=12_345, team_id=ctx.team_id,
    )  # fmt: skip


def _budgets(on: bool) -> BudgetBook:
    book = BudgetBook()
    if on:  # one of each scope, limits nothing reaches
        book.set_rules([
            BudgetRule("b-key", "key", "k-bench", "day", 10**14, None),
            BudgetRule("b-key-month", "key", "k-bench", "month", 10**14, None),
            BudgetRule("b-team", "team", "t-bench", "none", 10**14, None),
        ])  # fmt: skip
    return book


async def _one(limiter: RateLimiter | None, admit_us: list[float], total_us: list[float]) -> None:
    ctx = RequestContext(
        request_id=uuid.uuid4().hex, user_id="u-bench", key_id="k-bench", client_ip="10.0.0.1",
        team_id="t-bench",
    )  # fmt: skip
    t0 = time.perf_counter()
    if limiter is not None:
        await limiter.admit_completion(ctx, 30 + 256, 1_000_000)
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


async def main_async(redis_url: str | None, n: int, repeats: int, budgets: bool) -> None:
    backends: list[tuple[str, str | None]] = [("memory", None)]
    if not budgets:
        backends.insert(0, ("none", None))
    if redis_url:
        backends.append(("redis", redis_url))
    modes = (False, True) if budgets else (False,)
    added: list[str] = []
    print(f"{'backend':14} {'conc':>4} {'rep':>3}  admit p50/p99 µs   admit+settle p50/p99 µs")
    for concurrency in (1, 32):
        for name, url in backends:
            limiters: dict[bool, RateLimiter | None] = {}
            prefixes: list[str] = []
            for on in modes:
                prefix = f"bench:{uuid.uuid4().hex[:8]}"
                prefixes.append(prefix)
                settings = _settings(url, prefix)
                redis = SharedRedis.from_settings(settings)
                limiter = None
                if name != "none":
                    limiter = build_rate_limiter(settings, redis, _budgets(on))
                    await limiter.start()
                limiters[on] = limiter
                await _run(limiter, 500, concurrency)  # warm-up: connections, script load
            p50s: dict[bool, list[float]] = {on: [] for on in modes}
            for rep in range(repeats):
                for on in modes:  # alternating: the machine's load hits both alike
                    admit, total = await _run(limiters[on], n, concurrency)
                    p50s[on].append(_pct(admit, 50))
                    label = f"{name}{'+budgets' if on else ''}"
                    print(
                        f"{label:14} {concurrency:>4} {rep + 1:>3}  "
                        f"{_pct(admit, 50):8.0f} / {_pct(admit, 99):6.0f}     "
                        f"{_pct(total, 50):8.0f} / {_pct(total, 99):6.0f}"
                    )
            if budgets:
                off, on_ = statistics.median(p50s[False]), statistics.median(p50s[True])
                added.append(
                    f"{name:8} conc {concurrency:>2}: admit p50 {off:.0f} µs without budgets, "
                    f"{on_:.0f} µs with 3 budgets: +{on_ - off:.0f} µs"
                )
            for limiter, prefix in zip(limiters.values(), prefixes, strict=True):
                if limiter is None:
                    continue
                if name == "redis":
                    store = limiter.store
                    keys = [k async for k in store.redis.scan_iter(match=f"{{{prefix}}}:*")]  # type: ignore[attr-defined]
                    if keys:
                        await store.redis.delete(*keys)  # type: ignore[attr-defined]
                await limiter.aclose()
    for line in added:
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("-n", type=int, default=5000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budgets", action="store_true", help="p50 added by budgets: with vs without"
    )
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.redis or None, args.n, args.repeats, args.budgets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
