"""Refusals counted by reason, and each result's inference time (issue 12, after 0.3.0).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("what", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("last_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("what", "reason", name="uq_refusals_what_reason"),
    )
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("inference_s", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("inference_s")
    op.drop_table("refusals")
