"""annotation_deletions: tombstones, so a deletion wins over older versions in any order

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "annotation_deletions",
        sa.Column("ls_annotation_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ls_annotation_id", name=op.f("pk_annotation_deletions")),
    )
    # Deletions made before this table existed keep their time.
    op.execute(
        "INSERT INTO annotation_deletions (ls_annotation_id, deleted_at) "
        "SELECT ls_annotation_id, deleted_at FROM annotations "
        "WHERE deleted AND ls_annotation_id IS NOT NULL AND deleted_at IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table("annotation_deletions")
