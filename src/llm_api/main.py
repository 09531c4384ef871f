"""The app factory and its lifespan.

The lifespan builds every long-lived object (model backends, the database engine, the one Redis
client, HTTP pools) and then the typed `AppState` holding them, on `app.state.llm_api`;
api/deps.py hands them to routes. Models load in the background
so that /health answers at once and /ready turns 200 only after every model has warmed up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from llm_api.api.errors import install_error_handlers
from llm_api.api.openapi import install_openapi
from llm_api.api.v1.endpoints import health
from llm_api.api.v1.endpoints import metrics as metrics_endpoint
from llm_api.api.v1.router import include_v1
from llm_api.api.web import install_web_ui
from llm_api.core import worker_readiness
from llm_api.core.config import DEFAULT_JWT_SECRET, Settings
from llm_api.core.drain import DrainHook
from llm_api.core.gc_tuning import release_heap, settle_heap
from llm_api.core.logging import configure_logging
from llm_api.core.state import AppState
from llm_api.middleware.access_log import AccessLogMiddleware
from llm_api.middleware.body_limit import BodyLimitMiddleware
from llm_api.middleware.dev_secret_guard import DevSecretGuardMiddleware
from llm_api.middleware.drain import DrainMiddleware
from llm_api.middleware.request_id import RequestIdMiddleware
from llm_api.middleware.tracing import TracingMiddleware
from llm_api.services import tracing
from llm_api.services.auth.startup import start_accounts
from llm_api.services.batches.queue import start_batches
from llm_api.services.cache.service import build_cache_store
from llm_api.services.dashboard import SummaryService
from llm_api.services.fine_tuning.queue import start_fine_tuning
from llm_api.services.fine_tuning.serving import FineTunedModels
from llm_api.services.llm.backends.factory import build_backends
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.pipeline import PipelineParts, build_pipeline
from llm_api.services.llm.registry import load_registry
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.money.startup import start_money
from llm_api.services.observability import MetricsObserver, observability
from llm_api.services.rate_limit import start_rate_limiter
from llm_api.services.redis_pool import SharedRedis
from llm_api.services.response_store import ResponseStore
from llm_api.services.usage.pipeline import UsagePipeline

log = structlog.get_logger(__name__)


def build_llm_service(settings: Settings, redis: SharedRedis | None) -> LLMService:
    registry = load_registry(settings.models_file)
    backends = build_backends(registry, settings, redis)
    return LLMService(settings, registry, backends)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # One Redis client (and failure policy) for the cache, the limiter and the breakers.
    redis = SharedRedis.from_settings(settings)
    llm = build_llm_service(settings, redis)
    db, auth = await start_accounts(settings)
    on_drain: list[DrainHook] = []
    usage = UsagePipeline(settings, db.sessions)
    usage.start(on_drain)  # replays what a previous process left unflushed
    money = await start_money(settings, db.sessions)  # budgets and their webhook outbox
    limiter = await start_rate_limiter(settings, redis, money.budgets)
    # The completion pipeline, composed once (services/llm/pipeline.py): what each request
    # cost goes to the limiter's settlement, then the usage records, then the metrics.
    pipeline = build_pipeline(
        PipelineParts(
            llm,
            settings,
            store=build_cache_store(settings, redis),
            limiter=limiter,
            subscribers=(usage.recorder.on_completion, MetricsObserver()),
            response_hooks=usage.response_hooks,
        )
    )
    responses = CompletionServing(llm, pipeline)
    embeddings = EmbeddingService(llm, pipeline.cache.store, settings, pipeline.admission)
    files, batch_queue = start_batches(settings, db.sessions, responses, embeddings)
    stored_responses = ResponseStore(db.sessions, settings.responses_retention_days)
    stored_responses.start()  # the hourly retention purge
    fine_tuning = start_fine_tuning(settings, db.sessions, files, llm.registry)
    fine_tuned = llm.dynamic = FineTunedModels(llm, db.sessions, settings)
    state = app.state.llm_api = AppState(
        settings=settings,
        llm=llm,
        db=db,
        auth=auth,
        responses=responses,
        embeddings=embeddings,
        usage=usage,
        rate_limiter=limiter,
        money=money,
        files=files,
        batch_queue=batch_queue,
        summary=SummaryService(llm),
        stored_responses=stored_responses,
        fine_tuning=fine_tuning,
        fine_tuned=fine_tuned,
        on_drain=on_drain,
    )

    async def load_models() -> None:
        try:
            await llm.start()
            # Again, for the models' objects, and before /ready lets traffic in: the
            # collection pauses the event loop once.
            settle_heap()
            worker_readiness.mark_ready()
            log.info("models_ready", models=[m.id for m in llm.registry.models])
        except Exception:
            log.exception("model_load_failed")

    settle_heap()  # what exists now lives as long as the process (core/gc_tuning.py)
    loader = asyncio.create_task(load_models(), name="load-models")
    try:
        async with observability(state):  # metrics, SIGTERM drain, on_drain hooks at the end
            yield
    finally:
        state.draining = True
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await batch_queue.aclose()
        await stored_responses.aclose()
        await fine_tuning.aclose()
        await fine_tuned.aclose()
        await llm.aclose()
        await limiter.aclose()
        await money.aclose()
        await usage.aclose()  # after the models: cancelled requests have recorded by now
        await pipeline.aclose()
        if redis is not None:
            await redis.aclose()  # after everything that uses it
        await db.dispose()
        tracing.flush()  # the last requests' spans
        release_heap()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings)
    # OpenTelemetry traces, when the OTEL_* environment asks for them (services/tracing.py).
    traced = tracing.configure(settings.tracing_capture_content)
    app = FastAPI(
        title="llm-api",
        version="0.1.0",
        summary="An OpenAI-compatible API for local and upstream LLMs.",
        lifespan=lifespan,
        # Off unless asked for: FastAPI otherwise checks the global OpenTelemetry providers
        # (environment lookups included) on every request, ~1.5% of a proxied stream's CPU.
        # With our tracing on too, FastAPI's HTTP span goes to our exporter, around ours.
        telemetry=({"tracer_provider": tracing.provider()} if traced else None)
        if settings.otel_telemetry
        else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_openapi(app)
    include_v1(app)  # first: the hot routes are matched before the probes
    app.include_router(health.router)
    app.include_router(metrics_endpoint.router)
    if settings.web_ui:
        install_web_ui(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE", "PATCH", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Cache-Control"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        # A batch input file may be up to its own limit (plus the multipart envelope).
        per_path={"/v1/files": settings.batch_max_file_bytes + 64 * 1024},
    )
    app.add_middleware(DrainMiddleware)  # 503 while draining; cuts streams at the deadline
    # One log line and the HTTP metrics per request, after its last byte.
    app.add_middleware(AccessLogMiddleware)
    if traced:  # the request span, around everything that sees the request id
        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)
    # Outermost: everything after it (limits, access log) sees the real client address. The
    # server's own proxy handling is off (cli.py) so X-Forwarded-For is believed only from
    # LLM_API_TRUSTED_PROXIES, walked right to left; with none trusted there is nothing to do.
    if settings.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    if settings.jwt_secret == DEFAULT_JWT_SECRET:  # outermost: sees the connection as it came
        app.add_middleware(DevSecretGuardMiddleware)
    return app
