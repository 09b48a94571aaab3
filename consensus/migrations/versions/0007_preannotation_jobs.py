"""preannotation_jobs: whole Label Studio projects pre-annotated in the background, one active per project

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JOB_STATUS = ("queued", "running", "succeeded", "failed")
MODES = ("missing", "all")
ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "preannotation_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project", sa.BigInteger(), nullable=False),
        sa.Column(
            "mode", sa.Enum(*MODES, name="preannotationmode", native_enum=False, length=16), nullable=False
        ),
        sa.Column(
            "status", sa.Enum(*JOB_STATUS, name="jobstatus", native_enum=False, length=16), nullable=False
        ),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=True),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("resumed_from", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preannotation_jobs")),
    )
    op.create_index(
        "uq_preannotation_jobs_one_active",
        "preannotation_jobs",
        ["project"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_preannotation_jobs_one_active", table_name="preannotation_jobs")
    op.drop_table("preannotation_jobs")
