"""One thread owns SQLite's write connection and commits queued work in batches (group commit).

Each caller's work runs in its own savepoint, so one failure rolls back only that work; the batch then
commits once, and every caller's future resolves after the commit, i.e. once its write is durable.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting; the write itself has happened regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class GroupCommitWriter:
    def __init__(self, connect: Callable[[], sqlite3.Connection], *, max_batch: int = 256) -> None:
        self._connect = connect
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="billing-sqlite-writer", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    async def submit(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(work, future, loop))
        return await future

    async def close(self) -> None:
        """Commit everything queued so far, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        connection = self._connect()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch, stop = [job], False
                while len(batch) < self._max_batch:
                    try:
                        follower = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if follower is None:
                        stop = True
                        break
                    batch.append(follower)
                self._commit(connection, batch)
                if stop:
                    return
        finally:
            connection.close()

    def _commit(self, connection: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for job in batch:
                connection.execute("SAVEPOINT job")
                try:
                    outcomes.append((job, job.work(connection), None))
                except Exception as job_error:  # that caller gets its error; the rest of the batch commits
                    connection.execute("ROLLBACK TO job")
                    outcomes.append((job, None, job_error))
                connection.execute("RELEASE job")
            connection.execute("COMMIT")
        except Exception as batch_error:  # e.g. disk full or database locked: every caller hears of it
            logger.error(
                "billing write batch failed", extra={"batch": len(batch), "error": repr(batch_error)}
            )
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            outcomes = [(job, None, batch_error) for job in batch]
        for job, result, failure in outcomes:
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, result, failure)
            except RuntimeError:  # that event loop has closed; nobody is waiting any more
                pass
