"""The LLM service: the models (registry, backends, admission gates, lifecycle) and the
turning of validated wire requests into engine requests.

Running them is the pipeline's job (services/llm/pipeline.py): cache, admission, fallbacks,
backend, composed once in the lifespan.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog

from llm_api.api.v1.chat import protocol as chat_protocol
from llm_api.api.v1.completions import protocol as completions_protocol
from llm_api.core.config import Settings
from llm_api.core.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    PaymentRequiredError,
)
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.auth.key_controls import KeyControls, model_not_allowed
from llm_api.services.llm.admission import AdmissionGate
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.capabilities import check_capabilities
from llm_api.services.llm.fingerprint import fingerprints
from llm_api.services.llm.priority import fair_policy, reserved_slots
from llm_api.services.llm.registry import ModelConfig, Registry
from llm_api.services.llm.types import GenerationRequest, RequestContext

log = structlog.get_logger(__name__)


class DynamicModels(Protocol):
    """Models that exist per caller, beyond the registry (fine-tuned `ft:` models)."""

    async def ensure(self, model_id: str, ctx: RequestContext) -> None:
        """Check the caller may use the model and load it; ModelNotFoundError otherwise."""
        ...

    def visible_config(self, model_id: str, ctx: RequestContext) -> ModelConfig | None: ...


class LLMService:
    def __init__(self, settings: Settings, registry: Registry, backends: dict[str, Backend]):
        self.settings = settings
        self.registry = registry
        self.backends = backends
        policy = fair_policy(settings)
        self.gates = {
            m.id: AdmissionGate(
                m.id, m.concurrency, m.max_queue, policy, reserved=reserved_slots(settings, m)
            )
            for m in registry.models
        }
        self.started_at = int(time.time())
        self.fingerprints = fingerprints(registry)  # `system_fingerprint` per local model
        # Set by the drainer (core/drain.py) when it cuts in-flight work at the drain deadline:
        # a cancellation after that is the server's, recorded as 503, not a client's 499.
        self.drain_cut = asyncio.Event()
        # Fine-tuned models (services/fine_tuning/serving.py), set by the lifespan when on.
        self.dynamic: DynamicModels | None = None

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

    async def resolve(self, model_id: str, ctx: RequestContext) -> None:
        """Before planning a request: load a caller's own dynamic model (`ft:` ids)."""
        if self.dynamic is not None and self.registry.get(model_id) is None:
            await self.dynamic.ensure(model_id, ctx)

    def get_model_for(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """The model, if the caller's key and tier may use it: outside the key's allow-list
        403 (whether or not the model exists, so a key learns nothing of other models), a paid
        model answers free users 402. A caller's own fine-tuned (`ft:`) model is found once
        `resolve` has checked it is theirs."""
        config = self.check_key_may_use(model_id, ctx.controls)
        if config is None and self.dynamic is not None:
            config = self.dynamic.visible_config(model_id, ctx)
        if config is None:
            raise ModelNotFoundError(model_id)
        if not _entitled(config, ctx):
            raise PaymentRequiredError("Paid subscription required", param="model")
        return config

    def visible_model(self, model_id: str, controls: KeyControls | None) -> ModelConfig:
        """The model if the key's allow-list (key_controls.py) names it: 403, else 404."""
        config = self.check_key_may_use(model_id, controls)
        if config is None:
            raise ModelNotFoundError(model_id)
        return config

    def check_key_may_use(self, model_id: str, controls: KeyControls | None) -> ModelConfig | None:
        """403 unless the key's allow-list names the model by any of its names; returns the
        model (None if there is no such model, which the caller decides about)."""
        config = self.registry.get(model_id)
        if controls is not None and not controls.allows_model(_names(model_id, config)):
            raise model_not_allowed(model_id)
        return config

    def visible_models(self, controls: KeyControls | None) -> list[ModelConfig]:
        """The models a key may use (/v1/models lists only these)."""
        if controls is None:
            return list(self.registry.models)
        return [m for m in self.registry.models if controls.allows_model(_names(m.id, m))]

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
        return [config, *(f for f in fallbacks if _entitled(f, ctx) and _listed(f, ctx))]

    # --- request shaping ------------------------------------------------------------------------

    def chat_requests(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        """The model (tier, kind and capabilities checked here) and its engine requests (the
        family's protocol builds them)."""
        config = self._generative(req.model, ctx)
        check_capabilities(req, config)
        return config, chat_protocol.chat_requests(req, config, self.settings, ctx.request_id)

    def completion_requests(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        config = self._generative(req.model, ctx)
        check_capabilities(req, config)
        seqs = completions_protocol.completion_requests(req, config, self.settings, ctx.request_id)
        return config, seqs


def _names(model_id: str, config: ModelConfig | None) -> list[str]:
    """Every name a request for `model_id` goes by: what was asked, the id and the aliases."""
    return [model_id] if config is None else [model_id, config.id, *config.aliases]


def _listed(config: ModelConfig, ctx: RequestContext) -> bool:
    """Whether the key's allow-list names the model (a fallback outside it is skipped)."""
    return ctx.controls is None or ctx.controls.allows_model(_names(config.id, config))


def _entitled(config: ModelConfig, ctx: RequestContext) -> bool:
    """Whether the caller's tier may use the model: paid models are for paid callers."""
    return config.tier != "paid" or ctx.tier == "paid"
