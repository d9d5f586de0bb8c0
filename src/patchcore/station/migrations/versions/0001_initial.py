"""Initial schema: inspections, their evidence crops, and reviews.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

WATCHED = sa.text("source = 'watch'")


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("station", sa.String(length=255), nullable=False),
        sa.Column("photo_path", sa.Text(), nullable=False),
        sa.Column("photo_sha256", sa.String(length=64), nullable=False),
        sa.Column("stored_path", sa.Text(), nullable=True),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("pixel_threshold", sa.Float(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("overlay_path", sa.Text(), nullable=True),
        sa.Column("mask_path", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("source IN ('watch', 'service')", name=op.f("ck_inspections_source")),
        sa.CheckConstraint("verdict IN ('ok', 'ng', 'unrated', 'error')", name=op.f("ck_inspections_verdict")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inspections")),
    )
    op.create_index("ix_inspections_at", "inspections", ["at"])
    op.create_index("ix_inspections_model_name_at", "inspections", ["model_name", "at"])
    op.create_index("ix_inspections_verdict_at", "inspections", ["verdict", "at"])
    op.create_index("uq_inspections_watched_photo", "inspections", ["station", "photo_path", "photo_sha256"], unique=True,
                    sqlite_where=WATCHED, postgresql_where=WATCHED)

    op.create_table(
        "evidence_crops",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("inspection_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("picture_path", sa.Text(), nullable=True),
        sa.Column("distance", sa.Float(), nullable=False),
        sa.Column("box", sa.JSON(), nullable=False),
        sa.Column("training_image", sa.Text(), nullable=False),
        sa.Column("training_box", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"],
                                name=op.f("fk_evidence_crops_inspection_id_inspections"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evidence_crops")),
    )
    op.create_index("ix_evidence_crops_inspection_id", "evidence_crops", ["inspection_id"])

    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("inspection_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("who", sa.String(length=255), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint("verdict IN ('false_alarm', 'confirmed_defect')", name=op.f("ck_reviews_verdict")),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"],
                                name=op.f("fk_reviews_inspection_id_inspections"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("evidence_crops")
    op.drop_table("inspections")
