"""The Batch API (`client.batches`): create, retrieve, list, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Response

from llm_api.api.deps import BatchServiceDep, RequestCtx, StateDep, UserId
from llm_api.api.rate_limits import limit_request
from llm_api.api.scopes import requires_scope
from llm_api.schemas.batches import BatchList, BatchObject, CreateBatchRequest
from llm_api.services import tracing
from llm_api.services.batches.service import batch_object

router = APIRouter(tags=["batches"])


@router.post("/batches", response_model=BatchObject)
@requires_scope("inference")
async def create_batch(
    body: CreateBatchRequest,
    user_id: UserId,
    batches: BatchServiceDep,
    state: StateDep,
    ctx: RequestCtx,
    response: Response,
    background: BackgroundTasks,
) -> BatchObject:
    await limit_request(state, ctx, response)
    # A key's model allow-list covers its batches' lines too (checked here, at creation).
    controls = ctx.controls
    check = None if controls is None else lambda m: state.llm.check_key_may_use(m, controls)
    row = await batches.create_batch(user_id, body, check)
    # Dispatched after the response, i.e. after the session committed: a worker never sees a
    # batch that is not in the database yet.
    if state.batch_queue is not None:
        # With tracing on, the batch's run continues this request's trace.
        trace = tracing.traceparent(ctx.trace).get("traceparent") if ctx.trace else None
        background.add_task(state.batch_queue.enqueue, row.id, trace)
    return batch_object(row, batches.files)


@router.get("/batches", response_model=BatchList)
@requires_scope("inference")
async def list_batches(
    user_id: UserId,
    batches: BatchServiceDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    rows, has_more = await batches.list_batches(user_id, after, limit)
    return batches.page(rows, has_more)


@router.get("/batches/{batch_id}", response_model=BatchObject)
@requires_scope("inference")
async def get_batch(batch_id: str, user_id: UserId, batches: BatchServiceDep) -> BatchObject:
    return batch_object(await batches.get_batch(user_id, batch_id), batches.files)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
@requires_scope("inference")
async def cancel_batch(batch_id: str, user_id: UserId, batches: BatchServiceDep) -> BatchObject:
    return batch_object(await batches.cancel_batch(user_id, batch_id), batches.files)
