"""The fine-tuning API (`client.fine_tuning.jobs`): create, list, retrieve, cancel, events,
checkpoints. The logic is in services/fine_tuning."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Response

from llm_api.api.deps import CurrentPrincipal, FineTuningDep, RequestCtx, StateDep, UserId
from llm_api.api.rate_limits import limit_request
from llm_api.api.scopes import requires_scope
from llm_api.schemas.fine_tuning import (
    CreateFineTuningJobRequest,
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
)
from llm_api.services.fine_tuning.service import checkpoint_object, event_object, job_object

router = APIRouter(tags=["fine-tuning"])
After = Annotated[str | None, Query(max_length=64)]
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
@requires_scope("inference")
async def create_job(
    body: CreateFineTuningJobRequest,
    user_id: UserId,
    principal: CurrentPrincipal,
    jobs: FineTuningDep,
    state: StateDep,
    ctx: RequestCtx,
    response: Response,
    background: BackgroundTasks,
) -> FineTuningJob:
    await limit_request(state, ctx, response)
    row = await jobs.create(user_id, principal.team_id, body)
    # After the response, i.e. after the commit: a worker never sees a job not yet stored.
    background.add_task(state.fine_tuning.enqueue, row.id)
    return job_object(row)


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
@requires_scope("inference")
async def list_jobs(
    user_id: UserId, jobs: FineTuningDep, after: After = None, limit: Limit = 20
) -> FineTuningJobList:
    rows, has_more = await jobs.list_jobs(user_id, after, limit)
    return FineTuningJobList(data=[job_object(r) for r in rows], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
@requires_scope("inference")
async def get_job(job_id: str, user_id: UserId, jobs: FineTuningDep) -> FineTuningJob:
    return job_object(await jobs.get(user_id, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
@requires_scope("inference")
async def cancel_job(job_id: str, user_id: UserId, jobs: FineTuningDep) -> FineTuningJob:
    return job_object(await jobs.cancel(user_id, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningEventList)
@requires_scope("inference")
async def list_events(
    job_id: str, user_id: UserId, jobs: FineTuningDep, after: After = None, limit: Limit = 20
) -> FineTuningEventList:
    rows, has_more = await jobs.events(user_id, job_id, after, limit)
    return FineTuningEventList(data=[event_object(r) for r in rows], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=FineTuningCheckpointList)
@requires_scope("inference")
async def list_checkpoints(
    job_id: str, user_id: UserId, jobs: FineTuningDep, limit: Limit = 10
) -> FineTuningCheckpointList:
    job, rows, has_more = await jobs.checkpoints(user_id, job_id, limit)
    data = [checkpoint_object(r, job) for r in rows]
    return FineTuningCheckpointList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )
