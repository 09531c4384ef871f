"""money: prices, budgets and spend: usage records gain their cost (nano-dollars) and team;
budgets per key, user and team; the soft-limit webhook outbox

Revision ID: 0007_money
Revises: 0006_responses
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_money"
down_revision = "0006_responses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(
            sa.Column("cost_nanos", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("team_id", sa.String(32), nullable=True))
        batch.create_index("ix_usage_records_team_day", ["team_id", "day"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("subject_id", sa.String(32), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("hard_limit_nanos", sa.BigInteger(), nullable=False),
        sa.Column("soft_limit_nanos", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budgets")),
        sa.UniqueConstraint(
            "scope", "subject_id", "period", name="uq_budgets_scope_subject_period"
        ),
    )
    op.create_table(
        "budget_alerts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("budget_id", sa.String(32), nullable=False),
        sa.Column("period_start", sa.String(10), nullable=False),
        sa.Column("threshold", sa.String(8), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_alerts")),
        sa.UniqueConstraint(
            "budget_id", "period_start", "threshold", name="uq_budget_alerts_once_per_period"
        ),
    )
    op.create_index("ix_budget_alerts_due", "budget_alerts", ["sent_at", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_budget_alerts_due", table_name="budget_alerts")
    op.drop_table("budget_alerts")
    op.drop_table("budgets")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_index("ix_usage_records_team_day")
        batch.drop_column("team_id")
        batch.drop_column("cost_nanos")
