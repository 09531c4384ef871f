"""Soft-limit alerts: a database outbox (table `budget_alerts`) and the sender that delivers it.

A settlement that takes a budget to its soft limit inserts one row per (budget, period,
threshold); the unique key makes that once per period however many processes see the
crossing. Every process runs a sender: it claims due rows (a conditional UPDATE, so two senders
never post the same row at once), POSTs each to LLM_API_BUDGET_WEBHOOK_URL, and on failure
retries with exponential backoff (LLM_API_BUDGET_WEBHOOK_BACKOFF_SECONDS, doubling, with
jitter) up to LLM_API_BUDGET_WEBHOOK_MAX_ATTEMPTS. Rows live in the database, so a restart
sends what a previous process could not.

The body is JSON; `x-llm-api-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"
keyed by LLM_API_BUDGET_WEBHOOK_SECRET>` lets the receiver check it came from us and is fresh
(the scheme Stripe's webhooks use); `x-llm-api-event-id` lets it drop a repeat (a post whose
answer was lost is sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import structlog
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.db.tables import BudgetAlert, new_id, utcnow
from llm_api.services.money.budgets import BudgetRule
from llm_api.services.money.prices import usd_text

log = structlog.get_logger(__name__)

EVENT = "budget.soft_limit_reached"
CLAIM_S = 60.0  # a claimed row is another sender's again after this (its sender died)
POST_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 3600.0


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """The receiver's check (used by the tests; receivers may copy it)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _payload(rule: BudgetRule, period: str, total: int) -> dict[str, Any]:
    return {
        "type": EVENT,
        "budget": {
            "id": rule.id,
            "scope": rule.scope,
            "subject_id": rule.subject_id,
            "period": rule.period,
            "period_start": None if period == "none" else period,
            "hard_limit_usd": usd_text(rule.hard_nanos),
            "soft_limit_usd": usd_text(rule.soft_nanos or 0),
        },
        "spent_usd": usd_text(total),
        "created_at": datetime.now(UTC).isoformat(),
    }


class AlertOutbox:
    """Enqueues alerts (the budget book's soft-limit hook) and delivers them (`start`)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        poll_s: float = 2.0,
    ) -> None:
        self.sessions = sessions
        self.url = settings.budget_webhook_url
        secret = settings.budget_webhook_secret
        self.secret = secret.get_secret_value() if secret is not None else ""
        self.max_attempts = settings.budget_webhook_max_attempts
        self.backoff_s = settings.budget_webhook_backoff_seconds
        self.poll_s = poll_s
        self._client = client
        self._own_client = client is None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def enqueue(self, rule: BudgetRule, period: str, total: int) -> None:
        """Record the crossing (at most once per budget and period, across processes)."""
        if not self.enabled:
            return
        async with self.sessions.begin() as session:
            module: Any = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            stmt = module.insert(BudgetAlert).on_conflict_do_nothing(
                index_elements=["budget_id", "period_start", "threshold"]
            )
            now = utcnow()
            await session.execute(
                stmt.values(
                    id=new_id(),
                    budget_id=rule.id,
                    period_start=period,
                    threshold="soft",
                    payload=_payload(rule, period, total),
                    created_at=now,
                    attempts=0,
                    next_attempt_at=now,
                )
            )
        log.info("budget_soft_limit_reached", budget=rule.id, period=period)
        self._wake.set()

    # --- delivery -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=POST_TIMEOUT_S, follow_redirects=False)
            self._task = asyncio.create_task(self._loop(), name="budget-webhooks")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                await self.deliver_due()
            except Exception as exc:  # the database is down: try again later
                log.warning("budget_webhooks_failed", error=type(exc).__name__)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()

    async def deliver_due(self) -> int:
        """Post every due alert this sender can claim; the number delivered."""
        now = utcnow()
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(BudgetAlert.id, BudgetAlert.next_attempt_at)
                    .where(
                        BudgetAlert.sent_at.is_(None),
                        BudgetAlert.failed_at.is_(None),
                        BudgetAlert.next_attempt_at <= now,
                    )
                    .order_by(BudgetAlert.next_attempt_at)
                    .limit(50)
                )
            ).all()
        sent = 0
        for alert_id, due in rows:
            if await self._claim(alert_id, due):
                sent += await self._post(alert_id)
        return sent

    async def _claim(self, alert_id: str, due: datetime) -> bool:
        """Push the row's due time past the post (compare-and-set): only one sender wins."""
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(BudgetAlert)
                .where(BudgetAlert.id == alert_id, BudgetAlert.next_attempt_at == due)
                .values(next_attempt_at=utcnow() + timedelta(seconds=CLAIM_S))
            )
        return getattr(result, "rowcount", 0) == 1

    async def _post(self, alert_id: str) -> int:
        async with self.sessions() as session:
            alert = await session.get(BudgetAlert, alert_id)
            if alert is None:
                return 0
            body = orjson.dumps({"id": alert.id, **alert.payload})
            attempts = alert.attempts + 1
        assert self._client is not None and self.url is not None
        error: str | None = None
        try:
            response = await self._client.post(
                self.url,
                content=body,
                headers={
                    "content-type": "application/json",
                    "x-llm-api-event": EVENT,
                    "x-llm-api-event-id": alert_id,
                    "x-llm-api-signature": signature(self.secret, int(time.time()), body),
                },
            )
            if not response.is_success:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        if error is None:
            values["sent_at"] = utcnow()
        elif attempts >= self.max_attempts:
            values["failed_at"] = utcnow()
            log.error("budget_webhook_given_up", alert=alert_id, attempts=attempts, error=error)
        else:
            wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 1))
            values["next_attempt_at"] = utcnow() + timedelta(
                seconds=wait * random.uniform(0.8, 1.2)
            )
            log.warning("budget_webhook_retry", alert=alert_id, attempts=attempts, error=error)
        async with self.sessions.begin() as session:
            await session.execute(
                update(BudgetAlert).where(BudgetAlert.id == alert_id).values(**values)
            )
        return 1 if error is None else 0
