"""Build the backend a registry entry names."""

from __future__ import annotations

from llm_api.core.config import Settings
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.registry import ModelConfig, Registry
from llm_api.services.redis_pool import SharedRedis


def build_backend(config: ModelConfig, settings: Settings) -> Backend:
    if config.backend == "llama_cpp" and config.kind == "embedding":
        from llm_api.services.llm.backends.llama_embedding import LlamaEmbeddingBackend

        return LlamaEmbeddingBackend(
            config, threads=settings.llama_threads, cache_dir=settings.model_cache_dir
        )
    if config.backend == "llama_cpp" and config.engine == "batched":
        from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
        from llm_api.services.llm.priority import reserved_slots

        return LlamaBatchedBackend(
            config, threads=settings.llama_threads, reserved=reserved_slots(settings, config)
        )
    if config.backend == "llama_cpp":
        from llm_api.services.llm.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(config, threads=settings.llama_threads)
    from llm_api.services.llm.backends.openai_upstream import OpenAIUpstreamBackend

    return OpenAIUpstreamBackend(config)


def build_backends(
    registry: Registry, settings: Settings, redis: SharedRedis | None = None
) -> dict[str, Backend]:
    """Every model's backend. Routed models come last: they may share a local model's backend."""
    backends = {m.id: build_backend(m, settings) for m in registry.models if m.backend != "router"}
    if any(m.backend == "router" for m in registry.models):
        from llm_api.services.llm.routing.build import build_router

        for m in registry.models:
            if m.backend == "router":
                backends[m.id] = build_router(m, settings, backends, redis)
    return backends
