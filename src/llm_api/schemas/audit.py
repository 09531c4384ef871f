"""Wire types of GET /v1/admin/audit."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from llm_api.db.tables import AuditEvent
from llm_api.schemas.accounts import epoch


class AuditEventInfo(BaseModel):
    seq: int = Field(description="Position in the hash chain (newest has the highest).")
    object: Literal["audit_event"] = "audit_event"
    created_at: int
    action: str
    actor_id: str | None
    actor: str
    target_type: str | None
    target_id: str | None
    request_id: str | None
    client_ip: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    hash: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventInfo:
        return cls(
            seq=event.seq,
            created_at=epoch(event.created_at),
            action=event.action,
            actor_id=event.actor_id,
            actor=event.actor,
            target_type=event.target_type,
            target_id=event.target_id,
            request_id=event.request_id,
            client_ip=event.client_ip,
            before=event.before,
            after=event.after,
            hash=event.hash,
        )


class AuditEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventInfo]
    has_more: bool
    next_before: int | None = Field(
        None, description="Pass as `before` for the next (older) page; null on the last page."
    )
