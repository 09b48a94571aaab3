"""gold_labels: known labels of items (adjudication, histopathology) with their provenance

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gold_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("label_key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("reference", sa.String(length=300), nullable=True),
        sa.Column("observed_on", sa.String(length=32), nullable=True),
        sa.Column("ls_annotation_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_gold_labels_item_id_items"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gold_labels")),
        sa.UniqueConstraint(
            "item_id", "label_key", "source", name=op.f("uq_gold_labels_item_id_label_key_source")
        ),
    )
    op.create_index(op.f("ix_gold_labels_item_id"), "gold_labels", ["item_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_gold_labels_item_id"), table_name="gold_labels")
    op.drop_table("gold_labels")
