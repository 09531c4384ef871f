"""/v1/budgets: spending limits per key, user and team (services/money/budget_admin.py says who
may do what; anyone else gets 404)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from llm_api.api.deps import CurrentUser, DbSession, StateDep
from llm_api.api.scopes import requires_scope
from llm_api.schemas.budgets import BudgetCreate, BudgetList, BudgetOut, BudgetUpdate
from llm_api.services.money import budget_admin

router = APIRouter(prefix="/budgets", tags=["budgets"])


async def _applied(state: StateDep, db: DbSession) -> None:
    """Committed, and this process's budget book reloaded: the change binds at once here."""
    await db.commit()
    await state.money.budgets.refresh()


@router.post("", response_model=BudgetOut, status_code=201)
@requires_scope("account")
async def create_budget(
    body: BudgetCreate, user: CurrentUser, db: DbSession, state: StateDep
) -> BudgetOut:
    row = await budget_admin.create(db, user, body)
    await _applied(state, db)
    return await budget_admin.view(db, row)


@router.get("", response_model=BudgetList)
@requires_scope("account")
async def list_budgets(user: CurrentUser, db: DbSession) -> BudgetList:
    rows = await budget_admin.visible(db, user)
    return BudgetList(data=[await budget_admin.view(db, r) for r in rows])


@router.get("/{budget_id}", response_model=BudgetOut)
@requires_scope("account")
async def get_budget(budget_id: str, user: CurrentUser, db: DbSession) -> BudgetOut:
    return await budget_admin.view(db, await budget_admin.get(db, user, budget_id, write=False))


@router.patch("/{budget_id}", response_model=BudgetOut)
@requires_scope("account")
async def update_budget(
    budget_id: str, body: BudgetUpdate, user: CurrentUser, db: DbSession, state: StateDep
) -> BudgetOut:
    row = await budget_admin.update(db, user, budget_id, body)
    await _applied(state, db)
    return await budget_admin.view(db, row)


@router.delete("/{budget_id}", status_code=204)
@requires_scope("account")
async def delete_budget(
    budget_id: str, user: CurrentUser, db: DbSession, state: StateDep
) -> Response:
    await budget_admin.delete(db, user, budget_id)
    await _applied(state, db)
    return Response(status_code=204)
