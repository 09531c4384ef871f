"""api key scopes: every key gets a `scopes` column; existing keys become inference-only

Deliberately least privilege: a key made before scopes existed could do anything its owner
could, and nobody chose that. After this migration it can run inference (completions, models,
files, batches, own usage) and nothing else; managing keys or the account needs a password login
or a new key created with those scopes (docs/security.md, "API key scopes").

Revision ID: 0004_api_key_scopes
Revises: 0003_batches
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_api_key_scopes"
down_revision = "0003_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The server default fills every existing row; batch mode recreates the table on SQLite.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("scopes", sa.String(64), nullable=False, server_default="inference")
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes")
