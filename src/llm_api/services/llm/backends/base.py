"""The interface every model backend implements (in-process llama.cpp, OpenAI-compatible
upstreams). The service talks only to this."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import GenerationChunk, GenerationRequest


class Backend(Protocol):
    config: ModelConfig

    @property
    def ready(self) -> bool:
        """Loaded and warmed up: able to answer now."""
        ...

    async def start(self, warmup: bool = True) -> None:
        """Load weights or open connection pools; with `warmup`, run one short generation
        before reporting ready."""
        ...

    async def aclose(self) -> None: ...

    async def prepare(self, request: GenerationRequest) -> None:
        """Validate against the model before queueing: count prompt tokens, check the context
        window, compile grammars. Raises APIError subclasses."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Yield output pieces; the last has finish_reason and token counts. Closing the
        iterator early cancels generation."""
        ...
