"""What the lifespan builds and every request shares. Handed out through api/deps.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_api.core.config import Settings
from llm_api.core.drain import Drainer, DrainHook
from llm_api.db.engine import Database
from llm_api.services.auth.principal import AuthServices
from llm_api.services.batches.queue import BatchQueue
from llm_api.services.batches.storage import FileStore
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.rate_limit.limiter import RateLimiter
from llm_api.services.usage.pipeline import UsagePipeline


@dataclass
class AppState:
    settings: Settings
    llm: LLMService
    draining: bool = False
    db: Database | None = None  # engine + session maker (accounts issue)
    auth: AuthServices | None = None  # passwords, tokens, users, authenticator
    responses: CompletionServing | None = None  # chat/completions through the pipeline
    embeddings: EmbeddingService | None = None  # /v1/embeddings (shares `llm` and the cache)
    usage: UsagePipeline | None = None  # usage records: buffer, recorder, flusher
    rate_limiter: RateLimiter | None = None  # limits and quotas (services/rate_limit)
    files: FileStore | None = None  # Files API contents (batch input and output)
    batch_queue: BatchQueue | None = None  # Celery (Redis) or the embedded dispatcher
    extras: dict[str, Any] = field(default_factory=dict)
    # Run once on SIGTERM after in-flight requests end (or are cut), before the process exits:
    # register flushes here (`state.on_drain.append(recorder.flush)`).
    on_drain: list[DrainHook] = field(default_factory=list)
    drainer: Drainer = field(init=False)

    def __post_init__(self) -> None:
        self.drainer = Drainer(self, self.settings.drain_timeout, self.on_drain, self.llm.drain_cut)
