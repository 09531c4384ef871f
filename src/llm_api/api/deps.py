"""Dependencies, named as types so route signatures read like sentences.

Dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
dependency in the thread pool, a hop that costs more than the work itself on every request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.api.security import get_admin, get_current_user, get_principal
from llm_api.core.config import Settings
from llm_api.core.ids import new_request_id
from llm_api.core.state import AppState
from llm_api.middleware.access_log import CTX_KEY as ACCESS_LOG_CTX_KEY
from llm_api.middleware.request_id import GENERATED_KEY as GENERATED_REQUEST_ID_KEY
from llm_api.services.auth.principal import AuthServices, Principal
from llm_api.services.batches.service import BatchService, StorageQuotas
from llm_api.services.cache.service import CachePolicy
from llm_api.services.fine_tuning.queue import trainable_models
from llm_api.services.fine_tuning.service import FineTuningLimits, FineTuningService
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.priority import PRIORITY_HEADER, requested_priority
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.llm.types import RequestContext
from llm_api.services.tracing import SCOPE_KEY as TRACE_KEY


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.llm_api
    return state


async def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


async def get_llm_service(state: Annotated[AppState, Depends(get_state)]) -> LLMService:
    return state.llm


async def get_serving(state: Annotated[AppState, Depends(get_state)]) -> CompletionServing:
    assert state.responses is not None, "built in the lifespan"
    return state.responses


async def get_request_context(
    request: Request, principal: Annotated[Principal, Depends(get_principal)]
) -> RequestContext:
    return _request_context(request, principal)


def _request_context(request: Request, principal: Principal) -> RequestContext:
    client = request.client.host if request.client else None
    scope_state = request.scope.setdefault("state", {})
    ctx = RequestContext(
        # The X-Request-ID we generated, if we did (middleware/request_id.py says why never the
        # client's own).
        request_id=scope_state.get(GENERATED_REQUEST_ID_KEY) or new_request_id(),
        client_ip=client,
        user_id=principal.user_id,
        key_id=principal.key_id,
        tier=principal.tier,
        controls=principal.controls,
        trace=scope_state.get(TRACE_KEY),  # the request span's, when tracing is on
        priority=requested_priority(
            request.headers.get(PRIORITY_HEADER),
            principal.controls.priority if principal.controls else "interactive",
        ),
        team_id=principal.team_id,
    )
    # Kept in the scope state so the access log can read the token counts after the response
    # (for a stream, after its last frame).
    scope_state[ACCESS_LOG_CTX_KEY] = ctx
    return ctx


@dataclass(frozen=True, slots=True)
class Inference:
    """What a completion route needs: the service behind the cache, the request's context, its
    cache policy and the stream keep-alive interval."""

    responses: CompletionServing
    ctx: RequestContext
    cache_policy: CachePolicy
    keepalive: float


async def get_inference(
    request: Request, principal: Annotated[Principal, Depends(get_principal)]
) -> Inference:
    """One dependency for the hot routes instead of four: FastAPI solves each one with its own
    bookkeeping, and dependency solving was ~10% of a proxied stream's CPU in py-spy (the fast
    path's route handler solves this graph with none: api/fastpath)."""
    state: AppState = request.app.state.llm_api
    return Inference(
        responses=state.responses,
        ctx=_request_context(request, principal),
        cache_policy=CachePolicy.from_header(request.headers.get("cache-control")),
        keepalive=state.settings.sse_keepalive_seconds,
    )


@dataclass(frozen=True, slots=True)
class Embeddings:
    """What the embeddings route needs: the service, the request's context and cache policy."""

    service: EmbeddingService
    ctx: RequestContext
    cache_policy: CachePolicy


async def get_embeddings(
    request: Request, principal: Annotated[Principal, Depends(get_principal)]
) -> Embeddings:
    state: AppState = request.app.state.llm_api
    return Embeddings(
        service=state.embeddings,
        ctx=_request_context(request, principal),
        cache_policy=CachePolicy.from_header(request.headers.get("cache-control")),
    )


async def get_db(state: Annotated[AppState, Depends(get_state)]) -> AsyncIterator[AsyncSession]:
    """One session per request: commit on success, roll back on error. Services never commit.
    (An error may ask to keep its changes, e.g. a refresh-token family revoked on reuse.)"""
    async with state.db.sessions() as session:
        try:
            yield session
        except Exception as exc:
            if getattr(exc, "keep_changes", False):
                await session.commit()
            else:
                await session.rollback()
            raise
        await session.commit()


async def get_auth(state: Annotated[AppState, Depends(get_state)]) -> AuthServices:
    return state.auth


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LLMServiceDep = Annotated[LLMService, Depends(get_llm_service)]
ServingDep = Annotated[CompletionServing, Depends(get_serving)]
RequestCtx = Annotated[RequestContext, Depends(get_request_context)]
InferenceDep = Annotated[Inference, Depends(get_inference)]
EmbeddingsDep = Annotated[Embeddings, Depends(get_embeddings)]
# scope="function": commit before the response is sent, so a 2xx means the write is durable.
DbSession = Annotated[AsyncSession, Depends(get_db, scope="function")]
AuthDep = Annotated[AuthServices, Depends(get_auth)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
CurrentUser = Annotated[Principal, Depends(get_current_user)]
AdminUser = Annotated[Principal, Depends(get_admin)]


async def get_user_id(user: CurrentUser) -> str:
    assert user.user_id is not None  # get_current_user refuses callers without an account
    return user.user_id


UserId = Annotated[str, Depends(get_user_id)]


async def get_batch_service(state: StateDep, db: DbSession) -> BatchService:
    settings = state.settings
    return BatchService(
        db,
        state.files,
        max_bytes=settings.batch_max_file_bytes,
        max_lines=settings.batch_max_lines,
        quotas=StorageQuotas(
            max_stored_bytes=settings.files_max_bytes_per_user,
            max_files=settings.files_max_count_per_user,
            max_active_batches=settings.batch_max_active_per_user,
        ),
    )


BatchServiceDep = Annotated[BatchService, Depends(get_batch_service)]


async def get_fine_tuning_service(state: StateDep, db: DbSession) -> FineTuningService:
    settings = state.settings
    return FineTuningService(
        db,
        state.files,
        trainable_models(state.llm.registry),
        FineTuningLimits(
            max_active_jobs=settings.finetune_max_active_per_user,
            max_examples=settings.finetune_max_examples,
            max_seq_tokens=settings.finetune_max_seq_tokens,
        ),
    )


FineTuningDep = Annotated[FineTuningService, Depends(get_fine_tuning_service)]
