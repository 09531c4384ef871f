"""audit log

Revision ID: 0008_audit
Revises: 0007_money
Create Date: 2026-12-07
"""

from __future__ import annotations

revision = "0008_audit"
down_revision = "0007_money"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
