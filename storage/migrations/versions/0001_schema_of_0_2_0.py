"""The schema of pacs-node 0.2.0 (before migrations existed): the baseline.

A 0.2.0 database has these tables and no ``alembic_version``; ``storage.db.migrate`` stamps it
with this revision and upgrades it from here.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("patient_birth_date", sa.String(8), nullable=False),
        sa.Column("patient_sex", sa.String(16), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("referring_physician_name", sa.String(324), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_study_instance_uid", "studies", ["study_instance_uid"], unique=True)
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer, nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part_examined", sa.String(16), nullable=False),
        sa.Column("source_ae", sa.String(16), nullable=False),
        sa.Column("generated", sa.Boolean, nullable=False),
        sa.Column("last_received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_series_series_instance_uid", "series", ["series_instance_uid"], unique=True)
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"], unique=True)
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("not_before", sa.DateTime, nullable=False),
        sa.Column("lease_expires_at", sa.DateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("finished_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_jobs_series_pk", "jobs", ["series_pk"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_not_before", "jobs", ["not_before"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_pk", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sc_sop_instance_uids", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_results_job_pk", "results", ["job_pk"])
    op.create_index("ix_results_series_pk", "results", ["series_pk"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("destination_ae", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("lease_expires_at", sa.DateTime, nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("sent_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint("instance_pk", "destination_ae"),
    )
    op.create_index("ix_deliveries_instance_pk", "deliveries", ["instance_pk"])
    op.create_index("ix_deliveries_state", "deliveries", ["state"])
    op.create_index("ix_deliveries_next_attempt_at", "deliveries", ["next_attempt_at"])


def downgrade() -> None:
    for table in ("deliveries", "results", "jobs", "instances", "series", "studies"):
        op.drop_table(table)
