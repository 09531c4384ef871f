"""Build a routed model's backend from its registry entry: one pooled upstream backend per
upstream deployment, the shared backend of a referenced local model, and the breaker store
(Redis when `LLM_API_REDIS_URL` is set, else this process's memory)."""

from __future__ import annotations

from collections.abc import Mapping

from llm_api.core.config import Settings
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.backends.openai_upstream import OpenAIUpstreamBackend
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.routing.breaker import Breakers, MemoryBreakers, RedisBreakers
from llm_api.services.llm.routing.deployments import Deployment
from llm_api.services.llm.routing.router import RoutedBackend
from llm_api.services.redis_pool import SharedRedis


def build_router(
    config: ModelConfig,
    settings: Settings,
    local: Mapping[str, Backend],
    redis: SharedRedis | None,
) -> RoutedBackend:
    deployments: list[Deployment] = []
    for i, d in enumerate(config.deployments):
        name = d.name or f"{i}"
        if d.model is not None:
            backend = local[d.model]
        else:
            upstream = config.model_copy(
                update={
                    "backend": "openai",
                    "deployments": [],
                    "base_url": d.base_url,
                    "api_key_env": d.api_key_env,
                    "upstream_model": d.upstream_model or config.upstream_model or config.id,
                    "connect_timeout": d.connect_timeout,
                    "first_token_timeout": d.first_token_timeout,
                    "idle_timeout": d.idle_timeout,
                    "max_connections": d.max_connections,
                }
            )
            backend = OpenAIUpstreamBackend(upstream)
        deployments.append(
            Deployment(
                name=name,
                config=d,
                backend=backend,
                local=d.model is not None,
                alpha=config.routing.latency_alpha,
            )
        )
    return RoutedBackend(config, deployments, _breakers(config, settings, redis))


def _breakers(config: ModelConfig, settings: Settings, redis: SharedRedis | None) -> Breakers:
    policy = config.routing
    if redis is None:
        return MemoryBreakers(policy.breaker_failures, policy.breaker_cooldown)
    probe_ttl = max(d.first_token_timeout for d in config.deployments) + 5.0
    return RedisBreakers(
        redis.client,
        prefix=f"llm-api:cb:{config.id}",
        failures=policy.breaker_failures,
        cooldown=policy.breaker_cooldown,
        probe_ttl=probe_ttl,
        # A slow Redis must not hold requests: past the timeout, fall back to memory instead.
        timeout=settings.breaker_redis_timeout_ms / 1000,
        health=redis.health,
    )
