"""Engine-side types: what the service hands a backend, and what a backend yields back.

Kept free of HTTP and wire-format concerns so that the HTTP API, the batch worker and the
benchmarks drive backends the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from llm_api.services.auth.key_controls import KeyControls


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
    # Each sampled token's log-probability, and that many alternatives (0..20) per token.
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(slots=True)
class ToolSpec:
    """A function the model may call (OpenAI's `tools[].function`)."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool = False


@dataclass(slots=True)
class ToolCall:
    """A whole call, as it appears in an assistant message of the conversation so far."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(slots=True)
class Message:
    role: str  # system | developer | user | assistant | tool
    content: str
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # tool messages: the call this is the result of
    name: str | None = None


class Standing(Protocol):
    """A tenant's live standing at a model's admission gate (admission.TenantStanding)."""

    running: int  # its requests holding a slot, this one's included
    weight: float


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
    # Tools the model may call; `tool_choice` is none | auto | required | function (then
    # `tool_name` is the one function it must call).
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required", "function"] = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    # The client's request body as it came (validated): an upstream forwards it verbatim, with
    # only the model name and its own stream settings replaced, so no field is lost.
    wire: dict[str, Any] | None = None
    # Private to the backend between prepare() and generate() (token ids, compiled grammar).
    engine_state: dict[str, Any] = field(default_factory=dict)
    # Set at admission (services/llm/stages.py): its priority class and its tenant's share of
    # the model then (admission.Ticket.rank; the same for all under FIFO). The local engine
    # prefills lower ranks first, so a tenant holding little of the model is not queued behind
    # a busy tenant's burst of new prompts (engine/scheduler.py), and may cut a call of higher
    # ranks short (engine/interrupt.py).
    prefill_rank: tuple[int, float] = (0, 0.0)
    prefill_standing: Standing | None = None  # the tenant's live standing (fair queuing only)
    # The trace context an upstream request continues (services/tracing.py): the generation
    # span's, or the router's attempt span's while it calls a deployment. None: not traced.
    trace: Context | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error", "cancelled"]


@dataclass(slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int] | None


@dataclass(slots=True)
class TokenLogprob:
    """One sampled token's log-probability, with the most likely alternatives at that step."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a tool call, as OpenAI streams it: the call's `index` among this choice's
    calls; `id` and `name` in its first piece only; `arguments` (JSON text) in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Frame:
    """The one item every stage of the completion pipeline passes on: a piece of one choice's
    output. Backends make them; the wire encoders (SSE chunks, whole responses) read them.

    The last frame of a choice has `finish_reason` set and carries the final token counts."""

    text: str = ""
    tokens: int = 0  # completion tokens this piece stands for (partial counts on cancel)
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    index: int = 0  # the choice (n > 1)
    tool_calls: list[ToolCallDelta] | None = None
    reasoning: str | None = None  # `reasoning_content` (thinking models)
    logprobs: list[TokenLogprob] | None = None  # one per token of `text`
    # Of prompt_tokens, served from a reused prefix: on the finishing frame (what usage reads);
    # local engines repeat it on a sequence's first frame, for readers that stop early.
    cached_tokens: int | None = None
    # An upstream's fields that we do not interpret, verbatim: the choice's `delta` fields
    # (refusal, annotations, audio, ...) in `extra`; the usage's details
    # (prompt_tokens_details, completion_tokens_details, ...) in `usage_extra`.
    extra: dict[str, Any] | None = None
    usage_extra: dict[str, Any] | None = None
    # On a finishing "stop" frame of a local engine: the stop string that ended the choice
    # (None: the model's end of turn). Upstreams do not say (docs/api-families.md).
    stop_sequence: str | None = None


class GenerationStream(Protocol):
    def __aiter__(self) -> GenerationStream: ...

    async def __anext__(self) -> Frame: ...

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
    # The API key's model allow-list and own limits (services/auth/key_controls.py).
    controls: KeyControls | None = None
    # The request span's context, the parent of the pipeline's spans (services/tracing.py);
    # None whenever tracing is off.
    trace: Context | None = None
    # Fair queuing (services/llm/admission.py): the priority class (interactive, low or batch).
    priority: str = "interactive"
    team_id: str | None = None  # a team's service key: the team's budgets apply

    @property
    def tenant(self) -> str:
        """Whose share the request counts against (as Principal.tenant): the key's team, else
        the user; anonymous callers share one tenant."""
        if self.team_id is not None:
            return f"team:{self.team_id}"
        return f"user:{self.user_id}" if self.user_id is not None else "anonymous"


@dataclass(slots=True)
class CompletionRecord:
    """What one finished (or failed, or cancelled) request cost. The pipeline's subscribers
    (the rate limiter's settlement, the usage recorder, metrics) receive one per admitted
    request."""

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
    # What it cost, in nano-dollars (services/money/prices.py): the answering model's prices
    # times the tokens used; 0 for cache hits and for failures before any output.
    cost_nanos: int = 0
    team_id: str | None = None
