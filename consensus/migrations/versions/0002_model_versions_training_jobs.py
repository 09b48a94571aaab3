"""model_versions and training_jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MODEL_STATUS = ("candidate", "promoted", "retired", "rejected")
JOB_STATUS = ("queued", "running", "succeeded", "failed")


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=64), nullable=False),
        sa.Column(
            "status", sa.Enum(*JOB_STATUS, name="jobstatus", native_enum=False, length=16), nullable=False
        ),
        sa.Column("triggers", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("log", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_jobs")),
    )
    for status in ("queued", "running"):
        where = sa.text(f"status = '{status}'")
        op.create_index(
            f"uq_training_jobs_one_{status}",
            "training_jobs",
            ["status"],
            unique=True,
            sqlite_where=where,
            postgresql_where=where,
        )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("parent", sa.String(length=64), nullable=True),
        sa.Column(
            "status", sa.Enum(*MODEL_STATUS, name="modelstatus", native_enum=False, length=16), nullable=False
        ),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("consensus_run_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["consensus_run_id"],
            ["consensus_runs.id"],
            name=op.f("fk_model_versions_consensus_run_id_consensus_runs"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["training_jobs.id"],
            name=op.f("fk_model_versions_job_id_training_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    where = sa.text("status = 'promoted'")
    op.create_index(
        "uq_model_versions_one_promoted",
        "model_versions",
        ["status"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_promoted", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("uq_training_jobs_one_running", table_name="training_jobs")
    op.drop_index("uq_training_jobs_one_queued", table_name="training_jobs")
    op.drop_table("training_jobs")
