"""The SQLite writer thread's group commit: steps that must follow a commit run only after one."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from worker.billing.store.sqlite_writer import GroupCommitWriter


async def test_after_commit_runs_only_for_work_that_committed(tmp_path: Path) -> None:
    path = tmp_path / "w.db"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    with connect() as setup:
        setup.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    writer = GroupCommitWriter(connect)
    writer.start()
    ran: list[str] = []

    def committed_rows() -> list[int]:
        with connect() as reader:
            return [row[0] for row in reader.execute("SELECT id FROM t ORDER BY id")]

    def fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("this work fails")

    try:
        results = await asyncio.gather(
            writer.submit(lambda db: db.execute("INSERT INTO t VALUES (1)").rowcount,
                          after_commit=lambda: ran.append(f"first saw {committed_rows()}")),
            writer.submit(fail, after_commit=lambda: ran.append("failed")),
            writer.submit(lambda db: db.execute("INSERT INTO t VALUES (3)").rowcount,
                          after_commit=lambda: ran.append(f"third saw {committed_rows()}")),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], RuntimeError)
    # Each successful step ran once its work was committed; the failed work's step never ran.
    assert ran == ["first saw [1]", "third saw [1, 3]"]
    assert committed_rows() == [1, 3]


async def test_a_failing_after_commit_step_leaves_the_commit_standing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "w.db"
    writer = GroupCommitWriter(lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False))
    writer.start()

    def boom() -> None:
        raise OSError("cannot remove the file")

    try:
        await writer.submit(lambda db: db.execute("CREATE TABLE t (id INTEGER)"), after_commit=boom)
        assert await writer.submit(lambda db: db.execute("INSERT INTO t VALUES (1)").rowcount) == 1
    finally:
        await writer.close()
    assert "post-commit step failed" in caplog.text
