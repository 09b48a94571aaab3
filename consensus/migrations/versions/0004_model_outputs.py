"""model_outputs: per model version and output, its provenance; model_versions.release: a release's name

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("release", sa.String(length=128), nullable=True))
    op.create_table(
        "model_outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("output", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("n_images", sa.Integer(), nullable=True),
        sa.Column("n_positive", sa.Integer(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_outputs_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_outputs")),
        sa.UniqueConstraint(
            "model_version_id", "output", name=op.f("uq_model_outputs_model_version_id_output")
        ),
    )


def downgrade() -> None:
    op.drop_table("model_outputs")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("release")
