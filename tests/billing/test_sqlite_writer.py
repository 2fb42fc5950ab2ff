"""The SQLite store's database process and its group commit: one failing write fails only its caller; the
work runs outside the worker's process; reads never wait behind a batch or for the ledger journal; a process
that dies fails only what it was doing and is started again; closing commits everything sent."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.billing.support import ledger_entry, make_key
from tests.billing.test_ledger_store import reservation
from worker.billing.store import BalanceLimitExceeded, UnknownAccount
from worker.billing.store.database_process import DatabaseProcessGone
from worker.billing.store.records import ReserveOutcome
from worker.billing.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "ledger.db")
    try:
        yield opened
    finally:
        await opened.close()


@contextmanager
def write_lock_held_elsewhere(path: Path) -> Iterator[None]:
    """Another connection holds SQLite's write lock: the database process's next batch waits for it."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_failing_write_fails_only_its_caller_and_the_batch_commits(store: SqliteStore) -> None:
    results = await asyncio.gather(
        store.create_account("acct-1", "one", 100, 0.0),
        store.top_up("acct-missing", 5),
        store.top_up("acct-1", 10**16),
        store.create_account("acct-2", "two", 200, 0.0),
        return_exceptions=True,
    )
    assert isinstance(results[1], UnknownAccount) and isinstance(results[2], BalanceLimitExceeded)
    assert [a.id for a in await store.list_accounts()] == ["acct-1", "acct-2"]
    account = await store.get_account("acct-1")
    assert account is not None and account.balance_micro == 100


async def test_a_refused_reservation_leaves_nothing_held(store: SqliteStore) -> None:
    funded = await make_key(store, balance_micro=50)
    assert await store.reserve(reservation(funded.key, 80)) is ReserveOutcome.insufficient_balance
    key = await store.get_key(funded.key.id)
    # The key's part of the reservation was written before the account refused: it was rolled back.
    assert key is not None and key.reserved_micro == 0


async def test_the_database_work_runs_outside_the_workers_process(store: SqliteStore, tmp_path: Path) -> None:
    # The point of the process: no thread of the worker runs SQLite, so none waits for the worker's GIL.
    await store.create_account("acct-1", "one", 100, 0.0)
    pid = store.database.pid
    assert pid is not None and pid != os.getpid()
    database = str(tmp_path / "ledger.db")
    assert database in [f.path for f in psutil.Process(pid).open_files()]
    assert database not in [f.path for f in psutil.Process().open_files()]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("billing-sqlite")]


async def test_a_key_lookup_waits_neither_for_a_batch_nor_for_the_journal(store: SqliteStore, tmp_path: Path) -> None:
    funded = await make_key(store, balance_micro=1_000)
    await store.start_journal("worker-1")
    held = reservation(funded.key, 100)
    assert await store.reserve(held) is ReserveOutcome.reserved
    settling = await store.settle_soon(ledger_entry(held.record_id, key=funded.key, cost=10))
    with write_lock_held_elsewhere(tmp_path / "ledger.db"):
        top_up = asyncio.ensure_future(store.top_up(funded.account.id, 1))
        key = await asyncio.wait_for(store.find_key_by_hash(funded.key.key_hash), 5)
        assert key is not None and key.id == funded.key.id
        assert not settling.done() and not top_up.done()  # the lookup went past both
    assert isinstance(await settling, int) and (await top_up).balance_micro == 1_001
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000 + 1 - 10, 0)


async def test_a_database_process_that_dies_fails_what_it_held_and_is_started_again(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await store.create_account("acct-1", "one", 100, 0.0)
    first_pid = store.database.pid
    assert first_pid is not None
    with write_lock_held_elsewhere(tmp_path / "ledger.db"):
        waiting = asyncio.ensure_future(store.top_up("acct-1", 5))
        await until(lambda: store.pending_writes == 1)
        os.kill(first_pid, signal.SIGKILL)  # the process is waiting inside the batch: kill it there
        with pytest.raises(DatabaseProcessGone):
            await waiting
    await until(lambda: "billing database process exited" in caplog.text)
    # The next write starts a new process; the killed one's transaction never committed.
    assert (await store.top_up("acct-1", 7)).balance_micro == 107
    assert store.database.pid not in (None, first_pid)


async def test_closing_commits_what_was_sent_and_the_process_exits(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "ledger.db")
    await store.create_account("acct-1", "one", 0, 0.0)
    pid = store.database.pid
    pending = [asyncio.ensure_future(store.top_up("acct-1", 1)) for _ in range(300)]
    await asyncio.sleep(0)  # submitted; nothing committed yet
    await store.close()
    assert [(await p).balance_micro for p in pending] == list(range(1, 301))  # two batches, all committed
    assert pid is not None and not psutil.pid_exists(pid)
    with pytest.raises(RuntimeError, match="closed"):
        await store.top_up("acct-1", 1)
