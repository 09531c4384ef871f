"""fine-tuning jobs

Revision ID: 0009_fine_tuning
Revises: 0008_audit
Create Date: 2026-12-07
"""

from __future__ import annotations

revision = "0009_fine_tuning"
down_revision = "0008_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
