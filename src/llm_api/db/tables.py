"""ORM tables (the guide's "db/schemas.py"; see docs/architecture.md for the name).

Secrets are never stored in clear: passwords as argon2id hashes, API keys and refresh tokens as
SHA-256 digests (they are long random strings, so a fast hash is enough).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic can drop them on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str | None] = mapped_column(String(100), default=None)
    tier: Mapped[str] = mapped_column(String(16), default="free")
    role: Mapped[str] = mapped_column(String(16), default="user")
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated (services/auth/scopes.py); rows from before scopes get inference only.
    scopes: Mapped[str] = mapped_column(String(64), default="inference", server_default="inference")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Per-key controls (0005): a team's service key outlives the member who made it (user_id
    # stays the creator). None means "no restriction beyond the owner's".
    team_id: Mapped[str | None] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), default=None, index=True
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    models: Mapped[list | None] = mapped_column(JSON, default=None)  # ids, aliases, wildcards
    allowed_ips: Mapped[list | None] = mapped_column(JSON, default=None)  # CIDRs
    limits: Mapped[dict | None] = mapped_column(JSON, default=None)  # never above the tier's
    # The highest priority class its requests run in (docs/fair-sharing.md); None: interactive.
    priority: Mapped[str | None] = mapped_column(String(16), default=None)


class Team(Base):
    """A group of users sharing keys, usage and budgets."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TeamMember(Base):
    """A user's role in a team: owner, admin or member."""

    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16), default="member")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RefreshToken(Base):
    """One opaque refresh token. Tokens of one login share a `family_id`; rotating marks the old
    one `rotated_at`, and presenting a rotated token again revokes the whole family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (Index("ix_refresh_tokens_family_id", "family_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class StoredFile(Base):
    """An uploaded or generated file (Files API). Content lives in `data_dir/files/<id>`."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class Batch(Base):
    """A batch job. `lease_owner`/`lease_until` make sure one worker runs it at a time; a
    lease that expires (worker killed) lets another worker resume it."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_status_lease", "status", "lease_until"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256), default=None)
    input_file_id: Mapped[str] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    status: Mapped[str] = mapped_column(String(16), default="validating")
    completion_window: Mapped[str] = mapped_column(String(8), default="24h")
    metadata_json: Mapped[dict | None] = mapped_column(JSON, default=None)
    errors_json: Mapped[list | None] = mapped_column(JSON, default=None)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class BatchAttempt(Base):
    """How often a line was started. A line that crashes its worker every time (a poison line)
    is failed into the error file once it reaches the attempt limit."""

    __tablename__ = "batch_attempts"

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    custom_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


# --- usage records and the conversation log (issue 5) ------------------------------------------
# `user_id` is deliberately not a foreign key on these two tables: rows arrive later, from the
# durable usage buffer, and a user deleted in between must not make a batch of inserts fail
# forever. Usage rows outlive their user (they are the billing record).


class UsageRecord(Base):
    """One per /v1 request that reached a model or the cache. The request id is the primary
    key, so replaying the buffer never counts a request twice."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_user_day", "user_id", "day"),
        Index("ix_usage_records_day", "day"),
        Index("ix_usage_records_team_day", "team_id", "day"),  # money (0007)
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    day: Mapped[date] = mapped_column(Date)  # UTC day of created_at, for grouping
    user_id: Mapped[str | None] = mapped_column(String(32), default=None)
    key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    batch_id: Mapped[str | None] = mapped_column(String(40), default=None)
    model: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    ttft_ms: Mapped[float | None] = mapped_column(Float, default=None)
    latency_ms: Mapped[float] = mapped_column(Float)
    disconnected: Mapped[bool] = mapped_column(Boolean, default=False)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    # money (0007): what it cost (nano-dollars) and the team of its key, if any.
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    team_id: Mapped[str | None] = mapped_column(String(32), default=None)


class Conversation(Base):
    """A prompt and its response, kept only when LLM_API_CONVERSATION_LOG is on and the user has
    not opted out; deleted after LLM_API_CONVERSATION_RETENTION_DAYS."""

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_created_at", "created_at"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(32))
    request: Mapped[dict] = mapped_column(JSON)
    response: Mapped[list] = mapped_column(JSON)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)


class ConversationOptOut(Base):
    """A user who asked that their conversations not be stored."""

    __tablename__ = "conversation_log_opt_outs"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# --- stored responses (/v1/responses store; migration 0006) ------------------------------------


class StoredResponse(Base):
    """A /v1/responses answer kept for GET, `previous_response_id` and input_items (`store`,
    default true as OpenAI's); deleted after LLM_API_RESPONSES_RETENTION_DAYS. `tenant` is
    whose it is (Principal.tenant: a team key's team, else the user): every lookup is scoped by
    it. `input_items` is the whole conversation the model was sent (a chained response's holds
    its predecessors' turns), `response` the `response` object as answered (output, usage,
    instructions, metadata, settings)."""

    __tablename__ = "stored_responses"
    __table_args__ = (Index("ix_stored_responses_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(48))
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), default=None, index=True
    )
    key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    team_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    previous_response_id: Mapped[str | None] = mapped_column(String(64), default=None)
    input_items: Mapped[list] = mapped_column(JSON)
    response: Mapped[dict] = mapped_column(JSON)


# --- money: prices, budgets, spend (migration 0007) --------------------------------------------
# Money is an integer number of nano-dollars (1e-9 USD) everywhere (services/money/prices.py):
# exact on SQLite and PostgreSQL alike, and sums never drift. UsageRecord gains `cost_nanos`
# and `team_id` in the same migration.


class Budget(Base):
    """A spending limit on a key, a user or a team, per period (day, week, month: UTC calendar
    periods; none: for ever). `hard_limit_nanos` refuses requests; reaching `soft_limit_nanos`
    sends a webhook once per period (BudgetAlert)."""

    __tablename__ = "budgets"
    __table_args__ = (
        UniqueConstraint("scope", "subject_id", "period", name="uq_budgets_scope_subject_period"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(8))  # key | user | team
    subject_id: Mapped[str] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(8))  # day | week | month | none
    hard_limit_nanos: Mapped[int] = mapped_column(BigInteger)
    soft_limit_nanos: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_by: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class BudgetAlert(Base):
    """The webhook outbox: one row per budget, period and threshold crossed (the unique key
    makes "once per period" hold across processes), sent and retried by whichever process's
    sender claims it first; a restart finds the unsent rows here."""

    __tablename__ = "budget_alerts"
    __table_args__ = (
        UniqueConstraint(
            "budget_id", "period_start", "threshold", name="uq_budget_alerts_once_per_period"
        ),
        Index("ix_budget_alerts_due", "sent_at", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    budget_id: Mapped[str] = mapped_column(String(32))
    period_start: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, or "none"
    threshold: Mapped[str] = mapped_column(String(8))  # soft
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    last_error: Mapped[str | None] = mapped_column(String(200), default=None)


# --- audit log (migration 0008) -----------------------------------------------------------------


# Append-only from the application (services/audit): no code path updates or deletes a row except
# retention, which moves the chain's anchor forward first. Each row's `hash` covers the previous
# row's hash and its own canonical content (`llm-api audit verify`).


class AuditEvent(Base):
    """One administrative or security-relevant event. `seq` is the chain position, assigned
    while holding the chain head, so it has no gaps."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_created_at", "created_at"),
        Index("ix_audit_events_action", "action"),
        Index("ix_audit_events_actor_id", "actor_id"),
        Index("ix_audit_events_target_id", "target_id"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    action: Mapped[str] = mapped_column(String(64))
    actor_id: Mapped[str | None] = mapped_column(String(64), default=None)  # user id, or None
    actor: Mapped[str] = mapped_column(String(254))  # email, "cli", "system", "anonymous"
    target_type: Mapped[str | None] = mapped_column(String(32), default=None)
    target_id: Mapped[str | None] = mapped_column(String(64), default=None)
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    client_ip: Mapped[str | None] = mapped_column(String(64), default=None)
    before: Mapped[dict | None] = mapped_column(JSON, default=None)
    after: Mapped[dict | None] = mapped_column(JSON, default=None)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The chain's single head row (id 1): the last `seq` and `hash`, locked by each append so
    workers and replicas append one at a time; and the anchor, the last purged row's `seq` and
    `hash`, from which verification starts once retention has removed older rows."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    anchor_seq: Mapped[int] = mapped_column(BigInteger)
    anchor_hash: Mapped[str] = mapped_column(String(64))


# --- fine-tuning jobs (migration 0009) ----------------------------------------------------------


class FineTuningJob(Base):
    """A fine-tuning job (OpenAI's shape). Leased like a batch (`lease_owner/lease_until`): a
    worker that dies mid-training lets another resume from the last checkpoint. The trained
    adapter lives under `data_dir/fine_tuning/<id>/`; `fine_tuned_model` names it once done and
    `model_deleted_at` hides it again (DELETE /v1/models/{id})."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        Index("ix_fine_tuning_jobs_status_lease", "status", "lease_until"),
        Index("ix_fine_tuning_jobs_fine_tuned_model", "fine_tuned_model"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str | None] = mapped_column(String(32), default=None)  # the key's team
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(24), default="validating_files")
    error_json: Mapped[dict | None] = mapped_column(JSON, default=None)
    metadata_json: Mapped[dict | None] = mapped_column(JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), default=None)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)  # steps done (checkpointed or not)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    model_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class FineTuningEvent(Base):
    """One line of a job's log (`GET .../events`): status changes, and each step's loss."""

    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index("ix_fine_tuning_events_job_seq", "job_id", "seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)  # ordering (time in µs, ties broken by id)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(String(512))
    data: Mapped[dict | None] = mapped_column(JSON, default=None)


class FineTuningCheckpoint(Base):
    """A saved training state (adapter, optimiser, step) a resumed job starts from."""

    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True
    )
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    metrics: Mapped[dict] = mapped_column(JSON)
