"""The billing database process and its group commit: steps that must follow a commit run only after one;
the work runs outside the worker's process; a process that dies fails only what it was doing."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest

from worker.billing.store.sqlite_process import DatabaseProcess, DatabaseProcessGone
from worker.billing.store.sqlite_server import DatabaseSettings
from worker.billing.store.sqlite_writer import GroupCommitWriter


# Work sent to the database process must pickle: module-level functions.
def _insert(db: sqlite3.Connection, value: int) -> int:
    return db.execute("INSERT INTO t VALUES (?)", (value,)).rowcount


def _insert_then_fail(db: sqlite3.Connection, value: int) -> None:
    db.execute("INSERT INTO t VALUES (?)", (value,))
    raise RuntimeError("this work fails")


def _note_committed_rows(database: Path, note: Path) -> None:
    with sqlite3.connect(database) as reader:
        note.write_text(repr([row[0] for row in reader.execute("SELECT id FROM t ORDER BY id")]))


def _fail_after_commit() -> None:
    raise OSError("cannot remove the file")


def _process_and_threads(db: sqlite3.Connection) -> tuple[int, list[str]]:
    return os.getpid(), [thread.name for thread in threading.enumerate()]


def _sleep_then_insert(db: sqlite3.Connection, value: int, seconds: float, started: Path) -> int:
    started.touch()
    time.sleep(seconds)
    return _insert(db, value)


def _unpicklable(db: sqlite3.Connection) -> object:
    db.execute("INSERT INTO t VALUES (7)")
    return threading.Lock()


def _rows(database: Path) -> list[int]:
    with sqlite3.connect(database) as reader:
        return [row[0] for row in reader.execute("SELECT id FROM t ORDER BY id")]


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[DatabaseProcess, GroupCommitWriter, Path]]:
    path = tmp_path / "w.db"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode = WAL")
        setup.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    process = DatabaseProcess(DatabaseSettings(path, "NORMAL", readers=1))
    await process.start()
    writer = GroupCommitWriter(process)
    writer.start()
    try:
        yield process, writer, path
    finally:
        await writer.close()
        await process.close()


async def test_after_commit_runs_only_for_work_that_committed(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path], tmp_path: Path
) -> None:
    _, writer, path = database
    notes = {name: tmp_path / f"{name}.txt" for name in ("first", "failed", "third")}
    results = await asyncio.gather(
        writer.submit(partial(_insert, value=1),
                      after_commit=partial(_note_committed_rows, path, notes["first"])),
        writer.submit(partial(_insert_then_fail, value=2),
                      after_commit=partial(_note_committed_rows, path, notes["failed"])),
        writer.submit(partial(_insert, value=3),
                      after_commit=partial(_note_committed_rows, path, notes["third"])),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "this work fails"
    # The three were committed as one batch; each successful step ran once it was committed, the failed
    # work's step never ran.
    assert notes["first"].read_text() == "[1, 3]"
    assert notes["third"].read_text() == "[1, 3]"
    assert not notes["failed"].exists()
    assert _rows(path) == [1, 3]


async def test_a_failing_after_commit_step_leaves_the_commit_standing(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, writer, path = database
    assert await writer.submit(partial(_insert, value=1), after_commit=_fail_after_commit) == 1
    assert await writer.submit(partial(_insert, value=2)) == 1
    assert _rows(path) == [1, 2]
    # The database process does not log; the worker writes what it reported, in the worker's log.
    failed = [r for r in caplog.records if r.getMessage() == "billing post-commit step failed"]
    assert len(failed) == 1 and "cannot remove the file" in failed[0].error  # type: ignore[attr-defined]


async def test_the_database_work_runs_outside_the_workers_process(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path],
) -> None:
    # The point of the process: no thread of the worker runs SQLite, so none waits for the worker's GIL.
    process, writer, _ = database
    write_pid, _ = await writer.submit(_process_and_threads)
    read_pid, threads = await process.read(_process_and_threads)
    assert write_pid == read_pid == process.pid != os.getpid()
    assert "billing-sqlite-writer" in threads
    assert not [t.name for t in threading.enumerate() if t.name.startswith("billing-sqlite")]


async def test_a_result_that_cannot_be_sent_back_fails_only_its_caller(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path],
) -> None:
    _, writer, path = database
    results = await asyncio.gather(
        writer.submit(_unpicklable), writer.submit(partial(_insert, value=8)), return_exceptions=True
    )
    assert isinstance(results[0], RuntimeError) and "could not be sent" in str(results[0])
    assert results[1] == 1
    assert _rows(path) == [7, 8]  # the write itself happened; only its answer was lost


async def test_a_database_process_that_dies_fails_what_it_held_and_is_started_again(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    process, writer, path = database
    first_pid = process.pid
    assert first_pid is not None
    started = tmp_path / "started"
    slow = asyncio.ensure_future(
        writer.submit(partial(_sleep_then_insert, value=1, seconds=60, started=started))
    )
    while not started.exists():  # the process is inside the write: kill it there
        await asyncio.sleep(0.01)
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(DatabaseProcessGone):
        await slow
    assert "billing database process exited" in caplog.text
    # The next write starts a new process; the killed one's transaction never committed.
    assert await writer.submit(partial(_insert, value=2)) == 1
    assert process.pid not in (None, first_pid)
    assert _rows(path) == [2]


async def test_closing_lets_the_process_commit_what_it_was_sent_and_exit(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    process = DatabaseProcess(DatabaseSettings(path, "NORMAL", readers=1))
    writer = GroupCommitWriter(process)
    writer.start()
    pending = [asyncio.ensure_future(writer.submit(partial(_insert, value=v))) for v in range(1, 301)]
    await asyncio.sleep(0)  # submitted; nothing committed yet
    await writer.close()
    await process.close()
    assert [await p for p in pending] == [1] * 300  # two batches (at most 256 each), all committed
    assert _rows(path) == list(range(1, 301))
    with pytest.raises(RuntimeError, match="closed"):
        await writer.submit(partial(_insert, value=1000))


class _UnreadableThere:
    """Pickles here, but its unpickling raises (as work naming a function the process cannot import would)."""

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return getattr, (int, "no_such_attribute")


async def test_work_the_process_cannot_read_fails_only_its_request_and_the_process_goes_on(
    database: tuple[DatabaseProcess, GroupCommitWriter, Path],
) -> None:
    process, writer, path = database
    pid = process.pid
    with pytest.raises(RuntimeError, match="could not read the work sent"):
        await writer.submit(partial(_insert, value=_UnreadableThere()))
    with pytest.raises(RuntimeError, match="could not read the work sent"):
        await process.read(partial(_insert, value=_UnreadableThere()))
    assert await writer.submit(partial(_insert, value=5)) == 1
    assert process.pid == pid
    assert _rows(path) == [5]
