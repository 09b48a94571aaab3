"""annotation_exposure: the Label Studio prediction an annotation started from (AI exposure)

``parent_prediction`` is Label Studio's prediction id (null: the reader started from a blank task),
``parent_model_version`` the prediction's ``model_version``, and ``parent_labels`` /
``parent_diagnosis`` what the prediction showed the reader, read with the annotation parser (null
where the payload did not carry the prediction).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("annotations") as batch:
        batch.add_column(sa.Column("parent_prediction", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("parent_model_version", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("parent_labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("parent_diagnosis", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("annotations") as batch:
        batch.drop_column("parent_diagnosis")
        batch.drop_column("parent_labels")
        batch.drop_column("parent_model_version")
        batch.drop_column("parent_prediction")
