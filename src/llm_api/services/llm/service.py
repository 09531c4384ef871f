"""The LLM service: the models (registry, backends, admission gates, lifecycle) and the
turning of validated wire requests into engine requests.

Running them is the pipeline's job (services/llm/pipeline.py): cache, admission, fallbacks,
backend, composed once in the lifespan.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import structlog

from llm_api.core.config import Settings
from llm_api.core.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    PaymentRequiredError,
)
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.common import SamplingFields
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.llm.admission import AdmissionGate
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.registry import ModelConfig, Registry
from llm_api.services.llm.types import (
    GenerationRequest,
    Message,
    RequestContext,
    SamplingParams,
)

log = structlog.get_logger(__name__)


class LLMService:
    def __init__(self, settings: Settings, registry: Registry, backends: dict[str, Backend]):
        self.settings = settings
        self.registry = registry
        self.backends = backends
        self.gates = {
            m.id: AdmissionGate(m.id, m.concurrency, m.max_queue) for m in registry.models
        }
        self.started_at = int(time.time())
        # Set by the drainer (core/drain.py) when it cuts in-flight work at the drain deadline:
        # a cancellation after that is the server's, recorded as 503, not a client's 499.
        self.drain_cut = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for backend in self.backends.values():
            await backend.start(warmup=self.settings.warmup)

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()

    @property
    def ready(self) -> bool:
        return all(b.ready for b in self.backends.values())

    # --- models ---------------------------------------------------------------------------------

    def get_model(self, model_id: str) -> ModelConfig:
        config = self.registry.get(model_id)
        if config is None:
            raise ModelNotFoundError(model_id)
        return config

    def get_model_for(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """The model, if the caller's tier may use it (a paid model answers free users 402)."""
        config = self.get_model(model_id)
        if not _entitled(config, ctx):
            raise PaymentRequiredError("Paid subscription required", param="model")
        return config

    def _generative(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """A model for chat or text completion: an embedding model cannot generate."""
        config = self.get_model_for(model_id, ctx)
        if config.kind == "embedding":
            raise InvalidRequestError(
                f"The model `{model_id}` is an embedding model; use it with /v1/embeddings.",
                param="model",
            )
        return config

    def candidates(self, config: ModelConfig, ctx: RequestContext) -> list[ModelConfig]:
        """The model asked for, then its fallbacks that the caller may use: a fallback passes the
        same tier check as a direct request, so a free model's paid fallback never answers a
        free user (it is skipped, and the free model's own error stands)."""
        fallbacks = (self.get_model(f) for f in config.fallbacks)
        return [config, *(f for f in fallbacks if _entitled(f, ctx))]

    # --- request shaping ------------------------------------------------------------------------

    def _params(
        self, req: SamplingFields, config: ModelConfig, max_tokens: int | None
    ) -> SamplingParams:
        stop = req.stop_list()
        if len(stop) > self.settings.max_stop_sequences:
            raise InvalidRequestError(
                f"At most {self.settings.max_stop_sequences} stop sequences are allowed.",
                param="stop",
            )
        if req.n > self.settings.max_n:
            raise InvalidRequestError(f"`n` must be at most {self.settings.max_n}.", param="n")
        if req.stream_options is not None and not req.stream:
            raise InvalidRequestError(
                "`stream_options` is only allowed when `stream` is true.", param="stream_options"
            )
        req.reject_unsupported()
        d = config.defaults
        return SamplingParams(
            max_tokens=max_tokens or d.max_tokens,
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            stop=stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
        )

    def _check_lengths(self, texts: list[str], param: str) -> None:
        limit = self.settings.max_message_chars
        for text in texts:
            if len(text) > limit:
                raise InvalidRequestError(
                    f"A message is longer than {limit} characters.", param=param
                )

    def chat_requests(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        config = self._generative(req.model, ctx)
        if len(req.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"At most {self.settings.max_messages} messages are allowed.", param="messages"
            )
        messages = [Message(m.role, m.text()) for m in req.messages]
        self._check_lengths([m.content for m in messages], "messages")
        params = self._params(req, config, req.requested_max_tokens)
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            params.json_schema = {}
        elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            params.json_schema = rf.json_schema.schema_ or {}
        explicit = req.requested_max_tokens is not None
        return config, [
            self._sequence(ctx, config, params, i, explicit, messages=messages)
            for i in range(req.n)
        ]

    def completion_requests(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        config = self._generative(req.model, ctx)
        prompts = req.prompts()
        self._check_lengths(prompts, "prompt")
        params = self._params(req, config, req.max_tokens)
        if len(prompts) * req.n > self.settings.max_n * 4:
            raise InvalidRequestError("Too many prompts times `n`.", param="prompt")
        explicit = req.max_tokens is not None
        return config, [
            self._sequence(ctx, config, params, i, explicit, prompt=p)
            for p in prompts
            for i in range(req.n)
        ]

    @staticmethod
    def _sequence(
        ctx: RequestContext,
        config: ModelConfig,
        params: SamplingParams,
        index: int,
        explicit_max: bool,
        *,
        messages: list[Message] | None = None,
        prompt: str | None = None,
    ) -> GenerationRequest:
        seq_params = replace(params, stop=list(params.stop))
        if seq_params.seed is not None and index:
            seq_params.seed += index  # n>1 with a seed: distinct but reproducible choices
        return GenerationRequest(
            request_id=ctx.request_id,
            model=config.id,
            params=seq_params,
            messages=messages,
            prompt=prompt,
            explicit_max_tokens=explicit_max,
            user=ctx.user_id,
        )


def _entitled(config: ModelConfig, ctx: RequestContext) -> bool:
    """Whether the caller's tier may use the model: paid models are for paid callers."""
    return config.tier != "paid" or ctx.tier == "paid"
