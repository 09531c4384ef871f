"""Stored /v1/responses answers (`store`, default true as OpenAI's): kept in the database for
`GET /v1/responses/{id}`, `DELETE`, `input_items` and `previous_response_id`, scoped to whoever
made them (their tenant: a team key's team, else the user), and deleted after
LLM_API_RESPONSES_RETENTION_DAYS by an hourly purge (as the conversation log is).

The functions take the caller's session (routes' `DbSession`); `ResponseStore` opens its own
short transactions where no request session fits: saving after a generation (a stream's body
runs after the route's session has been committed) and the purge loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import delete
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.exceptions import NotFoundError, ServiceUnavailableError
from llm_api.db.tables import StoredResponse
from llm_api.services.auth.principal import Principal

log = structlog.get_logger(__name__)

PURGE_INTERVAL_S = 3600.0
# What one of our ids can look like (`resp_` and the request id): anything else is not found
# without a query (PostgreSQL refuses a NUL in text, for one).
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose a stored response is: `tenant` scopes every lookup; the rest is the record."""

    tenant: str
    user_id: str | None
    key_id: str | None
    team_id: str | None

    @classmethod
    def of(cls, principal: Principal) -> Owner:
        return cls(principal.tenant, principal.user_id, principal.key_id, principal.team_id)


def not_found(response_id: str) -> NotFoundError:
    # The same answer for an id that never existed, was deleted, expired or is someone else's.
    return NotFoundError(f"Response with id '{response_id[:80]}' not found.", param="response_id")


async def find(db: AsyncSession, tenant: str, response_id: str) -> StoredResponse | None:
    if not _ID.fullmatch(response_id):
        return None
    row = await db.get(StoredResponse, response_id)
    return row if row is not None and row.tenant == tenant else None


async def get(db: AsyncSession, tenant: str, response_id: str) -> StoredResponse:
    row = await find(db, tenant, response_id)
    if row is None:
        raise not_found(response_id)
    return row


async def remove(db: AsyncSession, tenant: str, response_id: str) -> None:
    if not _ID.fullmatch(response_id):
        raise not_found(response_id)
    result = await db.execute(
        delete(StoredResponse).where(
            StoredResponse.id == response_id, StoredResponse.tenant == tenant
        )
    )
    if not getattr(result, "rowcount", 0):
        raise not_found(response_id)


def page(
    items: list[dict[str, Any]],
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> dict[str, Any]:
    """OpenAI's list shape over a response's input items: `order` desc (OpenAI's default) is
    newest first; `after` an item id of the previous page (an unknown one: an empty page)."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item.get("id") for item in ordered]
        start = ids.index(after) + 1 if after in ids else len(ordered)
    data = ordered[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": start + limit < len(ordered),
    }


async def delete_before(db: AsyncSession, cutoff: datetime) -> int:
    result = await db.execute(delete(StoredResponse).where(StoredResponse.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


class ResponseStore:
    """Saving and reading outside a route's session, and the retention purge."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], retention_days: int) -> None:
        self.sessions = sessions
        self.retention = timedelta(days=retention_days)
        self._task: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self.sessions.begin() as db:
                yield db
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("response_store_failed", error=type(exc).__name__)
            raise ServiceUnavailableError("The response store is unavailable.") from None

    async def previous(self, owner: Owner, response_id: str) -> StoredResponse:
        """The response a `previous_response_id` names, if the caller's: else 404 (OpenAI's
        `previous_response_not_found`)."""
        async with self._transaction() as db:
            row = await find(db, owner.tenant, response_id)
        if row is None:
            raise NotFoundError(
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return row

    async def save(
        self,
        owner: Owner,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
    ) -> None:
        row = StoredResponse(
            id=response["id"],
            tenant=owner.tenant,
            user_id=owner.user_id,
            key_id=owner.key_id,
            team_id=owner.team_id,
            created_at=datetime.fromtimestamp(response["created_at"], UTC),
            model=response["model"],
            status=response["status"],
            previous_response_id=response.get("previous_response_id"),
            input_items=input_items,
            response=response,
        )
        async with self._transaction() as db:
            db.add(row)

    # --- retention ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._purge_loop(), name="responses-retention")

    async def purge(self, now: datetime | None = None) -> int:
        """Delete what is older than the retention; how many were deleted."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        async with self.sessions.begin() as db:
            deleted = await delete_before(db, cutoff)
        if deleted:
            log.info("stored_responses_expired", deleted=deleted)
        return deleted

    async def _purge_loop(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception as exc:  # the database is down: the next round tries again
                log.warning("responses_retention_failed", error=type(exc).__name__)
            await asyncio.sleep(PURGE_INTERVAL_S)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
