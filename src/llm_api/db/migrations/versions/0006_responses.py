"""stored responses (/v1/responses with store=true)

Revision ID: 0006_responses
Revises: 0005_teams_keys
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_responses"
down_revision = "0005_teams_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(48), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("team_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("input_items", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_stored_responses_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stored_responses")),
    )
    op.create_index(op.f("ix_stored_responses_user_id"), "stored_responses", ["user_id"])
    op.create_index(op.f("ix_stored_responses_created_at"), "stored_responses", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_stored_responses_created_at"), table_name="stored_responses")
    op.drop_index(op.f("ix_stored_responses_user_id"), table_name="stored_responses")
    op.drop_table("stored_responses")
