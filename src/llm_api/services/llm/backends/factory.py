"""Build the backend a registry entry names."""

from __future__ import annotations

from llm_api.core.config import Settings
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.registry import ModelConfig


def build_backend(config: ModelConfig, settings: Settings) -> Backend:
    if config.backend == "llama_cpp":
        from llm_api.services.llm.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(config, threads=settings.llama_threads)
    from llm_api.services.llm.backends.openai_upstream import OpenAIUpstreamBackend

    return OpenAIUpstreamBackend(config)
