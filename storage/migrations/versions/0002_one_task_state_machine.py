"""Jobs and deliveries become tasks: one set of states and columns (pacs-node 0.3.0).

Deliveries' states are renamed (pending -> queued, sending -> running, sent -> done),
``next_attempt_at`` becomes ``not_before`` and ``sent_at`` ``finished_at``. Both tables gain
the schedule stored on the row (priority, backoff, deadline) and the lease holder and its
heartbeat. Rows that were running belong to a process of the old version, which is gone: they
go back to the queue (the attempt they were in counts).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# the defaults 0.2.0 applied from its config; rows keep the schedule they were made under
JOB_SCHEDULE = {"backoff_initial_s": 10.0, "backoff_max_s": 600.0, "deadline_s": 600.0}
DELIVERY_SCHEDULE = {"backoff_initial_s": 5.0, "backoff_max_s": 600.0, "deadline_s": 600.0}


def _task_columns(batch: object, schedule: dict[str, float]) -> None:
    add = batch.add_column  # type: ignore[attr-defined]
    add(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    for name, value in schedule.items():
        add(sa.Column(name, sa.Float, nullable=False, server_default=str(value)))
    add(sa.Column("claimed_by", sa.String(64), nullable=False, server_default=""))
    add(sa.Column("heartbeat_at", sa.DateTime, nullable=True))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        _task_columns(batch, JOB_SCHEDULE)
        batch.create_index("ix_jobs_due", ["state", "priority", "not_before"])
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("next_attempt_at", new_column_name="not_before")
        batch.alter_column("sent_at", new_column_name="finished_at")
        batch.drop_index("ix_deliveries_next_attempt_at")
        _task_columns(batch, DELIVERY_SCHEDULE)
        batch.add_column(sa.Column("max_attempts", sa.Integer, nullable=False, server_default="8"))
        batch.add_column(sa.Column("updated_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("started_at", sa.DateTime, nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.create_index("ix_deliveries_not_before", ["not_before"])
        batch.create_index("ix_deliveries_due", ["state", "priority", "not_before"])
    deliveries = sa.table(
        "deliveries",
        sa.column("state", sa.String),
        sa.column("updated_at", sa.DateTime),
        sa.column("created_at", sa.DateTime),
        sa.column("finished_at", sa.DateTime),
    )
    for old, new in (("PENDING", "QUEUED"), ("SENDING", "QUEUED"), ("SENT", "DONE")):
        op.execute(deliveries.update().where(deliveries.c.state == old).values(state=new))
    op.execute(
        deliveries.update().values(
            updated_at=sa.func.coalesce(deliveries.c.finished_at, deliveries.c.created_at)
        )
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("updated_at", existing_type=sa.DateTime, nullable=False)
    jobs = sa.table("jobs", sa.column("state", sa.String), sa.column("lease_expires_at"))
    op.execute(
        jobs.update().where(jobs.c.state == "RUNNING").values(state="QUEUED", lease_expires_at=None)
    )


def downgrade() -> None:
    deliveries = sa.table("deliveries", sa.column("state", sa.String))
    for old, new in (("QUEUED", "PENDING"), ("RUNNING", "PENDING"), ("DONE", "SENT")):
        op.execute(deliveries.update().where(deliveries.c.state == old).values(state=new))
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_due")
        batch.drop_index("ix_deliveries_not_before")
        for name in (
            "priority",
            "backoff_initial_s",
            "backoff_max_s",
            "deadline_s",
            "claimed_by",
            "heartbeat_at",
            "max_attempts",
            "updated_at",
            "started_at",
        ):
            batch.drop_column(name)
        batch.alter_column("not_before", new_column_name="next_attempt_at")
        batch.alter_column("finished_at", new_column_name="sent_at")
        batch.create_index("ix_deliveries_next_attempt_at", ["next_attempt_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_due")
        for name in (
            "priority",
            "backoff_initial_s",
            "backoff_max_s",
            "deadline_s",
            "claimed_by",
            "heartbeat_at",
        ):
            batch.drop_column(name)
