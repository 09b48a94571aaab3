"""consensus_runs.kind (bcc / lesion); consensus_masks: a STAPLE region consensus per run, item and label

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RUN_KIND = ("bcc", "lesion")


def upgrade() -> None:
    # Every run stored before this revision is a bcc.xml one (the lesion pair's were not stored).
    with op.batch_alter_table("consensus_runs") as batch:
        batch.add_column(
            sa.Column(
                "kind",
                sa.Enum(*RUN_KIND, name="runkind", native_enum=False, length=16),
                server_default="bcc",
                nullable=False,
            )
        )
    op.create_table(
        "consensus_masks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("label_key", sa.String(length=64), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("mask", sa.LargeBinary(), nullable=False),
        sa.Column("raters", sa.JSON(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_consensus_masks_item_id_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["consensus_runs.id"],
            name=op.f("fk_consensus_masks_run_id_consensus_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consensus_masks")),
        sa.UniqueConstraint(
            "run_id", "item_id", "label_key", name=op.f("uq_consensus_masks_run_id_item_id_label_key")
        ),
    )
    with op.batch_alter_table("consensus_masks") as batch:
        batch.create_index(batch.f("ix_consensus_masks_item_id"), ["item_id"], unique=False)
        batch.create_index(batch.f("ix_consensus_masks_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_table("consensus_masks")
    with op.batch_alter_table("consensus_runs") as batch:
        batch.drop_column("kind")
