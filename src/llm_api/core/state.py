"""What the lifespan builds and every request shares. Handed out through api/deps.py.

Every field is built before the state is (main.lifespan), so none is optional and a route never
checks whether something exists yet: the app serves no request before its lifespan has started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_api.core.config import Settings
from llm_api.core.drain import Drainer, DrainHook
from llm_api.db.engine import Database
from llm_api.services.auth.principal import AuthServices
from llm_api.services.batches.queue import BatchQueue
from llm_api.services.batches.storage import FileStore
from llm_api.services.dashboard import SummaryService
from llm_api.services.fine_tuning.queue import FineTuneQueue
from llm_api.services.fine_tuning.serving import FineTunedModels
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.money.startup import Money
from llm_api.services.rate_limit.limiter import RateLimiter
from llm_api.services.response_store import ResponseStore
from llm_api.services.usage.pipeline import UsagePipeline


@dataclass
class AppState:
    settings: Settings
    llm: LLMService
    db: Database  # engine + session maker
    auth: AuthServices  # passwords, tokens, users, authenticator
    responses: CompletionServing  # chat/completions through the pipeline
    embeddings: EmbeddingService  # /v1/embeddings (shares `llm` and the cache)
    usage: UsagePipeline  # usage records: buffer, recorder, flusher
    rate_limiter: RateLimiter  # limits and quotas (services/rate_limit)
    money: Money  # budgets (charged by the limiter) and the soft-limit webhook outbox
    files: FileStore  # Files API contents (batch input and output)
    batch_queue: BatchQueue  # Celery (Redis) or the embedded dispatcher
    summary: SummaryService  # the admin dashboard's live numbers (keeps its own samples)
    stored_responses: ResponseStore  # /v1/responses `store`: save, previous, retention purge
    fine_tuning: FineTuneQueue  # fine-tuning jobs: Celery (Redis) or the embedded dispatcher
    fine_tuned: FineTunedModels  # `ft:` models, loaded per use (services/fine_tuning/serving)
    # Run once on SIGTERM after in-flight requests end (or are cut), before the process exits:
    # the lifespan passes the flushes it registers (`UsagePipeline.start(on_drain)`).
    on_drain: list[DrainHook]
    draining: bool = False
    drainer: Drainer = field(init=False)

    def __post_init__(self) -> None:
        self.drainer = Drainer(self, self.settings.drain_timeout, self.on_drain, self.llm.drain_cut)
