"""/v1/budgets: spending limits per key, user and team (services/money/budget_admin.py says who
may do what; anyone else gets 404)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from llm_api.api.deps import CurrentUser, DbSession, StateDep
from llm_api.api.scopes import requires_scope
from llm_api.db.tables import Budget
from llm_api.schemas.budgets import BudgetCreate, BudgetList, BudgetOut, BudgetUpdate
from llm_api.services import audit
from llm_api.services.money import budget_admin

router = APIRouter(prefix="/budgets", tags=["budgets"])


def _audited(row: Budget) -> dict[str, object]:
    """What the audit log keeps of a budget: whose it is, its period and its limits."""
    fields = ("scope", "subject_id", "period", "hard_limit_nanos", "soft_limit_nanos")
    return audit.changes(row, fields)


def _target(row: Budget) -> audit.Target:
    return audit.Target("budget", row.id)


async def _applied(state: StateDep, db: DbSession) -> None:
    """Committed, and this process's budget book reloaded: the change binds at once here."""
    await db.commit()
    await state.money.budgets.refresh()


@router.post("", response_model=BudgetOut, status_code=201)
@requires_scope("account")
async def create_budget(
    body: BudgetCreate, user: CurrentUser, db: DbSession, state: StateDep, request: Request
) -> BudgetOut:
    row = await budget_admin.create(db, user, body)
    await audit.record(
        db, user, "budget.created", _target(row), after=_audited(row), request=request
    )
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
    budget_id: str,
    body: BudgetUpdate,
    user: CurrentUser,
    db: DbSession,
    state: StateDep,
    request: Request,
) -> BudgetOut:
    before = _audited(await budget_admin.get(db, user, budget_id, write=True))
    row = await budget_admin.update(db, user, budget_id, body)
    old, new = audit.diff(before, _audited(row))
    await audit.record(
        db, user, "budget.updated", _target(row), before=old, after=new, request=request
    )
    await _applied(state, db)
    return await budget_admin.view(db, row)


@router.delete("/{budget_id}", status_code=204)
@requires_scope("account")
async def delete_budget(
    budget_id: str, user: CurrentUser, db: DbSession, state: StateDep, request: Request
) -> Response:
    before = _audited(await budget_admin.get(db, user, budget_id, write=True))
    await budget_admin.delete(db, user, budget_id)
    target = audit.Target("budget", budget_id)
    await audit.record(db, user, "budget.deleted", target, before=before, request=request)
    await _applied(state, db)
    return Response(status_code=204)
