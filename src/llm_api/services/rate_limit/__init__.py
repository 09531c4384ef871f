"""Rate limits, token quotas and concurrency caps per user, API key and client IP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_api.core.config import Settings
from llm_api.services.rate_limit.limiter import RateLimiter, build_rate_limiter
from llm_api.services.redis_pool import SharedRedis

if TYPE_CHECKING:
    from llm_api.services.money.budgets import BudgetBook


async def start_rate_limiter(
    settings: Settings, redis: SharedRedis | None, budgets: BudgetBook | None = None
) -> RateLimiter:
    """Build and start the limiter; `build_pipeline` makes it the completion pipeline's
    admission check and first subscriber (settled before any subscriber that awaits, so a
    cancelled request still frees its slot)."""
    limiter = build_rate_limiter(settings, redis, budgets)
    await limiter.start()
    return limiter


__all__ = ["RateLimiter", "build_rate_limiter", "start_rate_limiter"]
