"""Rate limits, token quotas and concurrency caps per user, API key and client IP."""

from __future__ import annotations

from llm_api.core.config import Settings
from llm_api.services.llm.service import LLMService
from llm_api.services.rate_limit.limiter import RateLimiter, build_rate_limiter
from llm_api.services.redis_pool import SharedRedis


async def start_rate_limiter(
    settings: Settings, llm: LLMService, redis: SharedRedis | None
) -> RateLimiter:
    """Build the limiter and hook it into the LLM service: checked before tokenization and before
    the model's admission gate; settled by the first observer (before any observer that awaits,
    so a cancelled request still frees its slot)."""
    limiter = build_rate_limiter(settings, redis)
    llm.admission_hooks.append(limiter.admit_completion)
    llm.observers.insert(0, limiter.on_completion)
    await limiter.start()
    return limiter


__all__ = ["RateLimiter", "build_rate_limiter", "start_rate_limiter"]
