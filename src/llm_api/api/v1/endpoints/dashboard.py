"""JSON for the web dashboards that no other route gives: the admin's live server summary and
a user's rate-limit standing. Thin: the numbers come from services/dashboard.py and
services/limits_standing.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from llm_api.api.deps import AdminUser, CurrentUser, RequestCtx, StateDep
from llm_api.api.scopes import requires_scope
from llm_api.schemas.dashboard import LimitsStanding, ServerSummary
from llm_api.services import limits_standing
from llm_api.services.dashboard import SummaryService

router = APIRouter(tags=["dashboard"])


async def get_summary_service(state: StateDep) -> SummaryService:
    """One SummaryService per app (it keeps the counter samples the rate is taken from)."""
    return state.summary


SummaryDep = Annotated[SummaryService, Depends(get_summary_service)]


@router.get("/admin/summary", response_model=ServerSummary)
@requires_scope("admin")
async def server_summary(_: AdminUser, state: StateDep, summary: SummaryDep) -> ServerSummary:
    """Requests running and waiting per model, and completion tokens per second (this worker)."""
    return summary.summary(draining=state.draining)


@router.get("/users/me/limits", response_model=LimitsStanding)
@requires_scope("inference")
async def my_limits(_: CurrentUser, ctx: RequestCtx, state: StateDep) -> LimitsStanding:
    """The caller's rate limits and what is left of each now (spends nothing)."""
    return await limits_standing.standing(state.rate_limiter, ctx)
