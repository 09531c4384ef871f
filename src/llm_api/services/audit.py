"""The audit log: administrative and security-relevant events, appended to a hash chain.

One entry point, `record(db, actor, action, target, before=..., after=..., request=...)`, adds
a row in the caller's transaction (it commits or rolls back with the change it describes).
Events that must outlive a failing request (a refused login) use `record_now`, which commits
in a session of its own.

The chain: each row stores the previous row's hash and its own, SHA-256 over the previous hash
and the row's canonical JSON. An append first updates the single head row (`audit_chain_head`),
which takes its row lock on PostgreSQL (held to commit, so workers and replicas append one at a
time) and the database's write lock on SQLite (the first write of a transaction), then reads
the head, so no two rows share a position. `verify` recomputes the chain and names the first
broken link. Retention (`purge`) deletes the oldest rows after moving the head's anchor (the
last purged row's position and hash) forward, so what is left still verifies.

Nothing else updates or deletes these rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request

from llm_api.core.config import Settings
from llm_api.core.redaction import redact
from llm_api.db.tables import AuditChainHead, AuditEvent, Base, User, as_utc, utcnow
from llm_api.middleware.request_id import GENERATED_KEY
from llm_api.services.auth.principal import Principal

GENESIS_HASH = "0" * 64
HEAD_ID = 1
USER_FIELDS = ("email", "tier", "role", "is_active", "display_name")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it: a user (id and email), or the server itself ("system", "cli")."""

    label: str
    user_id: str | None = None


SYSTEM = Actor("system")
CLI = Actor("cli")
ANONYMOUS = Actor("anonymous")


@dataclass(frozen=True, slots=True)
class Target:
    type: str
    id: str | None


ActorLike = Actor | Principal | User | None
TargetLike = Target | Base | None


def _actor(actor: ActorLike) -> Actor:
    if actor is None:
        return ANONYMOUS
    if isinstance(actor, Actor):
        return actor
    if isinstance(actor, User):
        return Actor(actor.email, actor.id)
    # A principal: the user behind a login or an API key (the key is part of the label).
    label = actor.email or actor.user_id or "anonymous"
    if actor.key_id is not None:
        label = f"{label} (key {actor.key_id})"
    return Actor(label[:254], actor.user_id)


_TARGET_TYPES = {"users": "user", "api_keys": "key", "teams": "team"}


def _target(target: TargetLike) -> Target | None:
    if target is None or isinstance(target, Target):
        return target
    table = target.__tablename__
    ident = getattr(target, "id", None)
    return Target(_TARGET_TYPES.get(table, table), None if ident is None else str(ident))


def _jsonable(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Plain JSON (what the database hands back), secrets masked, so the stored row and its
    hash agree after a round trip."""
    if value is None:
        return None
    plain = json.loads(json.dumps(dict(value), default=str, sort_keys=True))
    masked: dict[str, Any] = redact(plain)
    return masked


def canonical(event: AuditEvent) -> bytes:
    """The bytes a row's hash covers (everything but the hashes themselves)."""
    content = {
        "seq": event.seq,
        "created_at": as_utc(event.created_at).isoformat(timespec="microseconds"),
        "action": event.action,
        "actor_id": event.actor_id,
        "actor": event.actor,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "request_id": event.request_id,
        "client_ip": event.client_ip,
        "before": event.before,
        "after": event.after,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(event)).hexdigest()


def request_facts(request: Request | None) -> tuple[str | None, str | None]:
    """(request id, client address) of a request; the client address is the proxy-resolved
    one (LLM_API_TRUSTED_PROXIES)."""
    if request is None:
        return None, None
    state = request.scope.get("state", {})
    request_id = state.get("request_id") or state.get(GENERATED_KEY)
    return request_id, request.client.host if request.client else None


async def _lock_head(db: AsyncSession) -> tuple[int, str]:
    # An UPDATE first: it takes the head's row lock (PostgreSQL) or the write lock (SQLite)
    # before anything is read, so concurrent appenders queue here instead of forking the chain.
    locked = await db.execute(
        update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(seq=AuditChainHead.seq)
    )
    if getattr(locked, "rowcount", 0) != 1:
        raise RuntimeError("audit chain head missing: run `llm-api db upgrade`")
    row = (
        await db.execute(
            select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.id == HEAD_ID)
        )
    ).one()
    return int(row.seq), str(row.hash)


async def record(
    db: AsyncSession,
    actor: ActorLike,
    action: str,
    target: TargetLike = None,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    request: Request | None = None,
) -> AuditEvent:
    """Append one event in `db`'s transaction. `action` is dotted (`user.updated`,
    `auth.login_failed`); `before`/`after` hold the changed fields (secrets are masked)."""
    who, what = _actor(actor), _target(target)
    request_id, client_ip = request_facts(request)
    seq, prev_hash = await _lock_head(db)
    event = AuditEvent(
        seq=seq + 1,
        created_at=utcnow(),
        action=action,
        # Bounded to the columns (PostgreSQL refuses longer values rather than cutting them).
        actor_id=who.user_id,
        actor=who.label[:254],
        target_type=what.type[:32] if what else None,
        target_id=what.id[:64] if what and what.id else None,
        request_id=request_id[:128] if request_id else None,
        client_ip=client_ip[:64] if client_ip else None,
        before=_jsonable(before),
        after=_jsonable(after),
        prev_hash=prev_hash,
        hash="",
    )
    event.hash = chain_hash(prev_hash, event)
    db.add(event)
    await db.flush()
    await db.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == HEAD_ID)
        .values(seq=event.seq, hash=event.hash)
    )
    return event


async def record_now(
    sessions: async_sessionmaker[AsyncSession],
    actor: ActorLike,
    action: str,
    target: TargetLike = None,
    **fields: Any,
) -> None:
    """`record` in a transaction of its own, committed at once: for events whose request fails
    (and rolls its own session back), such as a refused login."""
    async with sessions.begin() as db:
        await record(db, actor, action, target, **fields)


def settings_snapshot(settings: Settings) -> dict[str, Any]:
    """The effective settings of this process (secrets masked when recorded)."""
    return {"pid": os.getpid(), "settings": settings.model_dump(mode="json")}


def changes(obj: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named attributes of `obj`, for `before`/`after`."""
    return {name: getattr(obj, name) for name in fields}


def diff(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the fields that changed."""
    changed = [k for k in after if before.get(k) != after[k]]
    return {k: before.get(k) for k in changed}, {k: after[k] for k in changed}


class FailureSampler:
    """Bounds how many refused-login rows this process writes per minute. The login throttle
    (services/rate_limit/login.py) already slows each (account, client) pair and each client;
    this caps what a distributed attack can add to the table: beyond `per_minute`, refusals are
    counted, and the next row written carries that count (`suppressed`)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.window_start = 0.0
        self.written = 0
        self.suppressed = 0

    def admit(self) -> int | None:
        """None: do not write a row. Otherwise the refusals suppressed since the last row."""
        now = time.monotonic()
        if now - self.window_start >= 60.0:
            self.window_start, self.written = now, 0
        if self.written >= self.per_minute:
            self.suppressed += 1
            return None
        self.written += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


# --- reading, verifying, purging -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    checked: int  # rows checked
    anchor_seq: int  # rows up to here were purged by retention
    head_seq: int
    broken_seq: int | None = None  # the first row whose link fails
    reason: str | None = None


async def _rows(db: AsyncSession, after_seq: int, page: int = 1000) -> AsyncIterator[AuditEvent]:
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq)
        batch = list((await db.execute(query.limit(page))).scalars())
        for event in batch:
            yield event
        if len(batch) < page:
            return
        after_seq = batch[-1].seq
        db.expunge_all()  # keep memory flat over a long chain


async def verify(db: AsyncSession) -> Verification:
    """Recompute the chain from the anchor to the head; stop at the first broken link."""
    head = await db.get(AuditChainHead, HEAD_ID)
    if head is None:
        return Verification(False, 0, 0, 0, None, "the chain head row is missing")
    anchor_seq, head_seq, head_hash = head.anchor_seq, head.seq, head.hash
    expected_seq, prev_hash, checked = anchor_seq + 1, head.anchor_hash, 0
    async for event in _rows(db, anchor_seq):
        if event.seq != expected_seq:
            return Verification(
                False, checked, anchor_seq, head_seq, expected_seq, f"row {expected_seq} missing"
            )
        if event.prev_hash != prev_hash:
            return Verification(
                False,
                checked,
                anchor_seq,
                head_seq,
                event.seq,
                "its previous hash does not match the row before it",
            )
        if chain_hash(prev_hash, event) != event.hash:
            return Verification(
                False,
                checked,
                anchor_seq,
                head_seq,
                event.seq,
                "its content does not match its hash",
            )
        prev_hash, expected_seq, checked = event.hash, expected_seq + 1, checked + 1
    last = expected_seq - 1
    if last != head_seq or prev_hash != head_hash:
        return Verification(
            False,
            checked,
            anchor_seq,
            head_seq,
            last + 1 if last < head_seq else last,
            f"the chain ends at {last} but the head says {head_seq}",
        )
    return Verification(True, checked, anchor_seq, head_seq)


async def purge(db: AsyncSession, before: datetime) -> int:
    """Retention: delete rows older than `before`, after moving the anchor to the newest of
    them, so the rest still verifies from it. Returns how many rows were deleted."""
    await _lock_head(db)
    last = (
        await db.execute(
            select(AuditEvent.seq, AuditEvent.hash)
            .where(AuditEvent.created_at < before)
            .order_by(AuditEvent.seq.desc())
            .limit(1)
        )
    ).one_or_none()
    if last is None:
        return 0
    anchor_seq = (
        await db.execute(select(AuditChainHead.anchor_seq).where(AuditChainHead.id == HEAD_ID))
    ).scalar_one()
    await db.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == HEAD_ID)
        .values(anchor_seq=last.seq, anchor_hash=last.hash)
    )
    # Rows are appended in time order, so everything up to `last` is older than `before`.
    result = await db.execute(delete(AuditEvent).where(AuditEvent.seq <= last.seq))
    return int(getattr(result, "rowcount", 0) or last.seq - anchor_seq)


async def count(db: AsyncSession) -> int:
    return int((await db.execute(select(func.count()).select_from(AuditEvent))).scalar_one())


@dataclass(frozen=True, slots=True)
class Filters:
    actor: str | None = None  # a user id or an actor label (email, "cli", "system")
    action: str | None = None  # exact, or a prefix ending in "." ("auth.")
    target: str | None = None  # a target id
    since: datetime | None = None
    until: datetime | None = None


def _where(query: Any, filters: Filters) -> Any:
    if filters.actor:
        query = query.where(
            (AuditEvent.actor_id == filters.actor) | (AuditEvent.actor == filters.actor)
        )
    if filters.action:
        if filters.action.endswith("."):
            query = query.where(AuditEvent.action.startswith(filters.action, autoescape=True))
        else:
            query = query.where(AuditEvent.action == filters.action)
    if filters.target:
        query = query.where(AuditEvent.target_id == filters.target)
    if filters.since is not None:
        query = query.where(AuditEvent.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(AuditEvent.created_at < filters.until)
    return query


async def search(
    db: AsyncSession, filters: Filters, limit: int, before_seq: int | None = None
) -> tuple[list[AuditEvent], bool]:
    """Newest first, `limit` rows below `before_seq` (the cursor); and whether more follow."""
    query = _where(select(AuditEvent), filters)
    if before_seq is not None:
        query = query.where(AuditEvent.seq < before_seq)
    rows = list(
        (await db.execute(query.order_by(AuditEvent.seq.desc()).limit(limit + 1))).scalars()
    )
    return rows[:limit], len(rows) > limit


async def stream(
    sessions: async_sessionmaker[AsyncSession], filters: Filters, page: int = 1000
) -> AsyncIterator[AuditEvent]:
    """Every matching row, newest first, a page per query (for the CSV export)."""
    before: int | None = None
    while True:
        async with sessions() as db:
            rows, more = await search(db, filters, page, before)
        for row in rows:
            yield row
        if not more:
            return
        before = rows[-1].seq
