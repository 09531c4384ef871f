"""GET /v1/admin/audit: the audit log, newest first, filtered and paged, or as CSV
(`?format=csv` or `Accept: text/csv`). Administrators with the `admin` scope only."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from llm_api.api.deps import DbSession, StateDep
from llm_api.api.scopes import requires_scope
from llm_api.api.security import get_admin
from llm_api.schemas.audit import AuditEventInfo, AuditEventList
from llm_api.services import audit

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(get_admin)])

CSV_COLUMNS = list(AuditEventInfo.model_fields)
Epoch = Annotated[int | None, Query(ge=0, le=253_402_300_799)]  # up to year 9999
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # PostgreSQL refuses NUL in text: a 400 here, not a 500


def _time(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _cell(value: object) -> str:
    """A CSV cell that a spreadsheet will not run: formulas are quoted (CSV injection)."""
    if isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    else:
        text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def _csv(state: StateDep, filters: audit.Filters) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    async for event in audit.stream(state.db.sessions, filters):
        info = AuditEventInfo.of(event).model_dump()
        writer.writerow([_cell(info[c]) for c in CSV_COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@router.get(
    "/audit",
    response_model=AuditEventList,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV when asked"}},
)
@requires_scope("admin")
async def list_audit_events(
    request: Request,
    db: DbSession,
    state: StateDep,
    actor: Annotated[
        str | None, Query(max_length=254, pattern=PRINTABLE, description="User id or label.")
    ] = None,
    action: Annotated[
        str | None,
        Query(max_length=64, pattern=PRINTABLE, description='Exact, or a prefix ending in "."'),
    ] = None,
    target: Annotated[
        str | None, Query(max_length=64, pattern=PRINTABLE, description="Target id.")
    ] = None,
    since: Epoch = None,
    until: Epoch = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**62, description="Cursor (seq).")] = None,
    format: Annotated[Literal["json", "csv"] | None, Query()] = None,  # noqa: A002
) -> AuditEventList | StreamingResponse:
    filters = audit.Filters(actor, action, target, _time(since), _time(until))
    wants_csv = format == "csv" or (
        format is None and "text/csv" in request.headers.get("accept", "")
    )
    if wants_csv:
        return StreamingResponse(
            _csv(state, filters),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
        )
    rows, more = await audit.search(db, filters, limit, before)
    return AuditEventList(
        data=[AuditEventInfo.of(r) for r in rows],
        has_more=more,
        next_before=rows[-1].seq if more else None,
    )
