"""Engine-side types: what the service hands a backend, and what a backend yields back.

Kept free of HTTP and wire-format concerns so that the HTTP API, the batch worker and the
benchmarks drive backends the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A JSON schema the output must match (json_schema), or {} for "any JSON object"
    # (json_object); None for free text.
    json_schema: dict[str, Any] | None = None


@dataclass(slots=True)
class Message:
    role: str
    content: str


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate. `messages` for chat, `prompt` for text completion."""

    request_id: str
    model: str
    params: SamplingParams
    messages: list[Message] | None = None
    prompt: str | None = None
    # False when max_tokens was defaulted: it may then shrink to fit the context window.
    explicit_max_tokens: bool = True
    # Set by backend.prepare() when it can count the prompt (local models).
    prompt_tokens: int | None = None
    user: str | None = None
    # The whole answer is collected before any of it reaches the client (a non-streaming
    # request): a failure part-way through may still be retried elsewhere.
    buffered: bool = False
    # Private to the backend between prepare() and generate() (token ids, compiled grammar).
    engine_state: dict[str, Any] = field(default_factory=dict)


FinishReason = Literal["stop", "length", "error", "cancelled"]


@dataclass(slots=True)
class GenerationChunk:
    """A piece of output. The last chunk of a sequence has `finish_reason` set and carries the
    final token counts."""

    text: str = ""
    tokens: int = 0  # completion tokens this piece stands for (partial counts on cancel)
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class GenerationStream(Protocol):
    def __aiter__(self) -> GenerationStream: ...

    async def __anext__(self) -> GenerationChunk: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class RequestContext:
    """Who asked and how to reach them; built per HTTP request (or batch line) in api/deps."""

    request_id: str
    user_id: str | None = None
    key_id: str | None = None
    tier: str = "free"
    batch_id: str | None = None
    client_ip: str | None = None
    # Filled in as the request runs, read by the access log and usage recorders.
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    cache: str | None = None
    # Headers the response must carry whatever its shape (x-ratelimit-*), set by services
    # before the first byte; middleware/response_headers.py adds them.
    response_headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class CompletionRecord:
    """What one finished (or failed, or cancelled) request cost. Observers such as the usage
    recorder and metrics receive one per request that reached a model."""

    request_id: str
    model: str
    endpoint: str
    user_id: str | None
    key_id: str | None
    batch_id: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    status: int
    cache_hit: bool
    cancelled: bool
    ttft_ms: float | None
    latency_ms: float
    queue_ms: float
    stream: bool
