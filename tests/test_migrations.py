"""Schema migrations: a database made by pacs-node 0.2.0, holding data, is upgraded in place and
the node goes on with it; a new database gets the same schema as the migrations make."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select, text

from storage.db import HEAD_REVISION, MIGRATIONS_DIR, Database, migrate
from storage.errors import SchemaError
from storage.models import Base, Delivery, Instance, Job, Result, Study, TaskState
from tests import scu
from tests.conftest import CR_CHEST, make_config
from tests.test_cli import run_cli

# made by tests/data/make_node_0_2_0_db.py at commit 9f8a744 (pacs-node 0.2.0): 3 studies,
# 12 instances (2 results with their SR and SCs), jobs done, skipped and queued, 6 deliveries
# that failed against an unreachable peer
V0_2_0 = Path(__file__).parent / "data" / "node-0.2.0.sqlite3"


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "var" / "node.sqlite3"
    target.parent.mkdir(parents=True)
    shutil.copy(V0_2_0, target)
    return target


def _schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_head_revision_is_the_newest_migration():
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


def test_a_0_2_0_database_with_data_is_upgraded_and_used(tmp_path):
    path = _copy(tmp_path)
    raw = sqlite3.connect(path)
    before = {
        t: raw.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("studies", "series", "instances", "jobs", "results", "deliveries")
    }
    old_states = dict(raw.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert "alembic_version" not in {
        r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    raw.close()
    url = f"sqlite:///{path}"

    engine = create_engine(url)
    try:
        assert migrate(engine).startswith("upgraded from 0.2.0")
        assert migrate(engine) == "up to date"
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert version == HEAD_REVISION
    finally:
        engine.dispose()
    assert _schema_diff(url) == []

    db = Database(url)
    try:
        with db.read() as session:
            for model, table in (
                (Study, "studies"),
                (Instance, "instances"),
                (Job, "jobs"),
                (Result, "results"),
                (Delivery, "deliveries"),
            ):
                assert len(session.scalars(select(model)).all()) == before[table]
            states = {s: 0 for s in TaskState}
            for job in session.scalars(select(Job)).all():
                states[job.state] += 1
            assert {s.name: n for s, n in states.items() if n} == old_states
            deliveries = session.scalars(select(Delivery)).all()
            assert {d.state for d in deliveries} == {TaskState.FAILED}
            assert all(d.max_attempts == 8 and d.backoff_initial_s == 5.0 for d in deliveries)
            assert all("TESTSCU@127.0.0.1:1" in d.last_error for d in deliveries)
            assert all(d.updated_at is not None for d in deliveries)
    finally:
        db.dispose()

    # the node runs on it: the queued job from 0.2.0 is analysed, a new study is stored
    # and analysed, and the old failed deliveries can be retried
    config_file = tmp_path / "node.toml"
    config_file.write_text(f'[node]\nstorage_dir = "{tmp_path / "var"}"\n')
    retried = run_cli("retry", "--config", str(config_file))
    assert retried.returncode == 0 and "requeued 6 failed deliveries" in retried.stdout


def test_the_upgraded_database_serves_the_node(tmp_path, start_node):
    _copy(tmp_path)  # the rows only: the files of 0.2.0 are not copied
    node = start_node(make_config(tmp_path))
    assert node.run_pending() == 1  # the job 0.2.0 left queued: its files are gone here
    cr = pydicom.dcmread(CR_CHEST)
    cr.StudyInstanceUID, cr.SeriesInstanceUID = generate_uid(), generate_uid()
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert scu.store(node.port, [cr])[0].Status == 0
    assert node.run_pending() == 1
    with node.db.read() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [j.state for j in jobs[-2:]] == [TaskState.SKIPPED, TaskState.DONE]
        assert "no readable instance" in jobs[-2].last_error
        assert jobs[-1].priority == 10 and jobs[-1].deadline_s > 0  # the new schedule columns


def test_a_new_database_has_the_schema_the_migrations_make(tmp_path):
    made = f"sqlite:///{tmp_path / 'made.sqlite3'}"
    Database(made).dispose()  # create_all and stamp
    assert _schema_diff(made) == []

    from alembic import command

    stepwise = f"sqlite:///{tmp_path / 'stepwise.sqlite3'}"
    engine = create_engine(stepwise)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    engine.dispose()
    assert _schema_diff(stepwise) == []


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = _copy(tmp_path)
    url = f"sqlite:///{path}"
    Database(url).dispose()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE alembic_version SET version_num = '0099'")
    raw.commit()
    raw.close()
    with pytest.raises(SchemaError, match="0099"):
        Database(url)
