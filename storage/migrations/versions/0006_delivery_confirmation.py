"""Whether a delivered result was confirmed at its destination, how and when, and the
Storage Commitment transaction that asked (after 0.3.0).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("confirmation", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("confirmed_at", sa.DateTime, nullable=True))
        batch.add_column(
            sa.Column("transaction_uid", sa.String(64), nullable=False, server_default="")
        )
        batch.create_index("ix_deliveries_transaction_uid", ["transaction_uid"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_transaction_uid")
        batch.drop_column("transaction_uid")
        batch.drop_column("confirmed_at")
        batch.drop_column("confirmation")
