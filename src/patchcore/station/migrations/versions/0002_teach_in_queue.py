"""Reviews: whether the reviewer's name was checked against a teach-in token, and the teach-in
queue's state (who applied a false alarm, when, and the model version that learnt it).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (nullable, or with a server default): SQLite needs no table rebuild.
    op.add_column("reviews", sa.Column("who_verified", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("reviews", sa.Column("taught_by", sa.String(length=255), nullable=True))
    op.add_column("reviews", sa.Column("taught_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("reviews", sa.Column("taught_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("taught_version")
        batch.drop_column("taught_at")
        batch.drop_column("taught_by")
        batch.drop_column("who_verified")
