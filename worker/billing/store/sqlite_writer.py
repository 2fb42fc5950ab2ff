"""One thread owns SQLite's write connection and commits queued work in batches (group commit).

The event loop hands the thread one batch at a time: what callers submit while a batch is being written
waits on the loop and goes as the next batch. So a commit costs one hand-over to the thread and one
wake-up of the loop, however many writes it holds, instead of one of each per write.

Each caller's work runs in its own savepoint, so one failure rolls back only that work; the batch then
commits once, and every caller's future resolves after the commit, i.e. once its write is durable.
Writes of one kind (`submit_item`, e.g. ledger records) that follow each other in a batch run through a
single call, which keeps the thread's per-write Python work (it holds the GIL against the event loop)
small; when that call fails, its items are retried one by one, so only the failing caller hears of it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Writes many items in the current transaction; returns one result per item, in order.
ManyWork = Callable[[sqlite3.Connection, list[Any]], Sequence[Any]]
# (future, result, error) for every job of a batch, resolved on the event loop.
_Outcome = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[Any]
    work: Callable[[sqlite3.Connection], Any] | None = None
    many: ManyWork | None = None
    item: Any = None
    # Runs in the writer thread once the job's work has committed (not when it failed).
    after_commit: Callable[[], None] | None = None

    def run_alone(self, connection: sqlite3.Connection) -> Any:
        if self.many is not None:
            return self.many(connection, [self.item])[0]
        assert self.work is not None
        return self.work(connection)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting; the write itself has happened regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class GroupCommitWriter:
    """Used from the one event loop that started it."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], *, max_batch: int = 256) -> None:
        self._connect = connect
        self._max_batch = max_batch
        self._batches: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="billing-sqlite-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Loop side: jobs waiting for the next batch; the size of the batch with the thread; and whether
        # neither a batch nor a hand-over is under way.
        self._waiting: list[_Job] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def queued(self) -> int:
        """Writes submitted and not yet committed."""
        return len(self._waiting) + self._in_flight

    async def submit(
        self, work: Callable[[sqlite3.Connection], T], *, after_commit: Callable[[], None] | None = None
    ) -> T:
        """Run `work` in a write transaction; returns its result once that transaction has committed.

        `after_commit` runs in the writer thread right after the commit, if `work` succeeded."""
        return await self._enqueue(_Job(self._new_future(), work=work, after_commit=after_commit))

    async def submit_item(self, many: ManyWork, item: Any) -> Any:
        """Like `submit`, for writes of one kind: items of the same `many` that meet in a batch are
        written by one `many(connection, items)` call."""
        return await self._enqueue(_Job(self._new_future(), many=many, item=item))

    async def close(self) -> None:
        """Commit everything submitted so far, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        self._batches.put(None)
        await asyncio.to_thread(self._thread.join)

    # Event-loop side.
    def _new_future(self) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("the billing store is used from another event loop than the one it opened on")
        return loop.create_future()

    def _enqueue(self, job: _Job) -> asyncio.Future[Any]:
        self._waiting.append(job)
        if self._idle.is_set():
            self._idle.clear()
            if job.many is None:  # e.g. a reservation, which the engine waits for: at once
                self._hand_over()
            else:  # on the next turn of the loop, so that the records submitted in this one join the batch
                job.future.get_loop().call_soon(self._hand_over)
        return job.future

    def _hand_over(self) -> None:
        batch = self._waiting[: self._max_batch]
        del self._waiting[: self._max_batch]
        self._in_flight = len(batch)
        self._batches.put(batch)

    def _batch_done(self, outcomes: list[_Outcome]) -> None:
        self._in_flight = 0
        for future, result, error in outcomes:
            _resolve(future, result, error)
        if self._waiting:
            self._hand_over()
        else:
            self._idle.set()

    # Writer thread.
    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        connection: sqlite3.Connection | None = None
        try:
            while (batch := self._batches.get()) is not None:
                try:
                    connection = connection or self._connect()
                    outcomes = self._commit(connection, batch)
                except Exception as error:  # no connection: every caller hears why, and close() still ends
                    logger.error("billing database unavailable", extra={"error": repr(error)})
                    outcomes = [(job.future, None, error) for job in batch]
                try:
                    loop.call_soon_threadsafe(self._batch_done, outcomes)
                except RuntimeError:  # the event loop has closed; nobody is waiting any more
                    return
        finally:
            if connection is not None:
                connection.close()

    def _commit(self, connection: sqlite3.Connection, batch: list[_Job]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for group in _groups(batch):
                if len(group) > 1 and _try_together(connection, group, outcomes):
                    continue
                for job in group:
                    _run_in_savepoint(connection, job, outcomes)
            connection.execute("COMMIT")
            _run_after_commit(batch, outcomes)
        except Exception as batch_error:  # e.g. disk full or database locked: every caller hears of it
            logger.error(
                "billing write batch failed", extra={"batch": len(batch), "error": repr(batch_error)}
            )
            try:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            except Exception:  # the callers hear of the first error; the thread must go on
                logger.exception("billing write batch could not be rolled back")
            outcomes = [(job.future, None, batch_error) for job in batch]
        return outcomes


def _run_after_commit(batch: list[_Job], outcomes: list[_Outcome]) -> None:
    failed = {id(future) for future, _, error in outcomes if error is not None}
    for job in batch:
        if job.after_commit is not None and id(job.future) not in failed:
            try:
                job.after_commit()
            except Exception:  # the commit stands; only the clean-up after it failed
                logger.exception("billing post-commit step failed")


def _groups(batch: list[_Job]) -> Iterator[list[_Job]]:
    """Runs of consecutive items of the same kind; every other job alone. Order is kept."""
    group: list[_Job] = []
    for job in batch:
        if group and (job.many is None or job.many != group[0].many):
            yield group
            group = []
        group.append(job)
        if job.many is None:
            yield group
            group = []
    if group:
        yield group


def _try_together(connection: sqlite3.Connection, group: list[_Job], outcomes: list[_Outcome]) -> bool:
    many = group[0].many
    assert many is not None
    connection.execute("SAVEPOINT together")
    try:
        results = many(connection, [job.item for job in group])
    except Exception:  # one of them fails: find out which by writing each on its own
        connection.execute("ROLLBACK TO together")
        connection.execute("RELEASE together")
        return False
    connection.execute("RELEASE together")
    outcomes.extend((job.future, result, None) for job, result in zip(group, results, strict=True))
    return True


def _run_in_savepoint(connection: sqlite3.Connection, job: _Job, outcomes: list[_Outcome]) -> None:
    connection.execute("SAVEPOINT job")
    try:
        outcomes.append((job.future, job.run_alone(connection), None))
    except Exception as job_error:  # that caller gets its error; the rest of the batch commits
        connection.execute("ROLLBACK TO job")
        outcomes.append((job.future, None, job_error))
    connection.execute("RELEASE job")
