"""stored responses (/v1/responses with store=true)

Revision ID: 0006_responses
Revises: 0005_teams_keys
Create Date: 2026-12-07
"""

from __future__ import annotations

revision = "0006_responses"
down_revision = "0005_teams_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
