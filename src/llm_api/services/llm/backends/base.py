"""The interface every model backend implements (in-process llama.cpp, OpenAI-compatible
upstreams). The service talks only to this."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import Frame, GenerationRequest, Message, SamplingParams


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

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        """Yield output pieces; the last has finish_reason and token counts. Closing the
        iterator early cancels generation."""
        ...


def warmup_request(model_id: str) -> GenerationRequest:
    """The short greedy generation a local backend runs at start, before `/ready` turns 200:
    it pages the weights in and builds llama.cpp's compute graphs."""
    return GenerationRequest(
        request_id="warmup",
        model=model_id,
        params=SamplingParams(max_tokens=2, temperature=0.0, top_p=1.0),
        messages=[Message("user", "Hi")],
    )
