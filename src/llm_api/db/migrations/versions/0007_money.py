"""money: prices, budgets and spend

Revision ID: 0007_money
Revises: 0006_responses
Create Date: 2026-12-07
"""

from __future__ import annotations

revision = "0007_money"
down_revision = "0006_responses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
