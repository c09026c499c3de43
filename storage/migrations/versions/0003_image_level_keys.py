"""IMAGE-level C-FIND keys kept on the instance row: Rows, Columns, ContentDate (0.3.0).

Instances stored before this revision have them empty (NULL, ''): the files are not read again.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("rows", sa.Integer, nullable=True))
        batch.add_column(sa.Column("columns", sa.Integer, nullable=True))
        batch.add_column(sa.Column("content_date", sa.String(8), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in ("rows", "columns", "content_date"):
            batch.drop_column(name)
