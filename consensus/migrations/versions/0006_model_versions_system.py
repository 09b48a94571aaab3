"""model_versions.system: which served system a version belongs to; one promoted version per system

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WHERE = sa.text("status = 'promoted'")


def upgrade() -> None:
    op.drop_index("uq_model_versions_one_promoted", table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(
            sa.Column("system", sa.String(length=32), nullable=False, server_default="multitask")
        )
    op.create_index(
        "uq_model_versions_one_promoted",
        "model_versions",
        ["system", "status"],
        unique=True,
        sqlite_where=WHERE,
        postgresql_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_promoted", table_name="model_versions")
    op.execute("DELETE FROM model_versions WHERE system <> 'multitask'")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("system")
    op.create_index(
        "uq_model_versions_one_promoted",
        "model_versions",
        ["status"],
        unique=True,
        sqlite_where=WHERE,
        postgresql_where=WHERE,
    )
