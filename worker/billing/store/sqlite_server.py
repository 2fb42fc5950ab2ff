"""The billing database's own process: it owns the SQLite connections and runs the work the worker sends.

Why a process and not threads in the worker: Python's sqlite3 module gives the GIL up around every
statement and needs it back after. The worker's event loop, busy relaying streams, gives the GIL up at
every poll and takes it straight back, which restarts a waiting thread's wait for it; threads doing
SQLite work there were starved for hundreds of milliseconds at a time, and reservations (which a request
waits for before the engine sees it) with them. Here the GIL is contended by nobody busy, and the worker
needs it once per batch to send the batch and once to take the answers.

Work arrives as picklable callables (module-level functions, or `functools.partial` of them) taking the
connection. Writes come in batches, committed in one transaction (group commit): each job runs in its own
savepoint, so one failure rolls back only that job; items of one kind (`WriteJob.many`) that follow each
other run through a single call, retried one by one when it fails, so only the failing caller hears of it.
Reads run on a small pool of read-only connections beside the writer (WAL lets them read while it writes).
The process ends when the worker's end of the socket closes, after finishing what it was sent: so a worker
that is killed still has the batch it handed over committed.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import signal
import socket
import sqlite3
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

# Frames on the sockets: the length of the pickle and the request's id (8 bytes each, big-endian), then
# the pickle. The id is outside the pickle so that work which cannot be unpickled here still gets its answer.
FRAME_HEADER = struct.Struct("!QQ")
BUSY_TIMEOUT_S = 30.0

# Writes many items in the current transaction; returns one result per item, in order.
ManyWork = Callable[[sqlite3.Connection, list[Any]], Sequence[Any]]


class WriteJob(NamedTuple):
    work: Callable[[sqlite3.Connection], Any] | None = None
    many: ManyWork | None = None
    item: Any = None
    # Runs in this process once the job's work has committed (not when it failed).
    after_commit: Callable[[], None] | None = None

    def run_alone(self, connection: sqlite3.Connection) -> Any:
        if self.many is not None:
            return self.many(connection, [self.item])[0]
        assert self.work is not None
        return self.work(connection)


class Outcome(NamedTuple):
    error: BaseException | None
    result: Any = None


class LogNote(NamedTuple):
    """A log line for the worker to write: this process does not log (the worker's log is the one with the
    configured format), it sends what happened with the answer."""

    level: int
    message: str
    extra: dict[str, Any]


class WriteAnswer(NamedTuple):
    outcomes: list[Outcome]
    notes: list[LogNote]


class DatabaseSettings(NamedTuple):
    path: Path
    synchronous: str  # "NORMAL" or "FULL"
    readers: int


def connect(settings: DatabaseSettings) -> sqlite3.Connection:
    connection = sqlite3.connect(
        settings.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA synchronous = {settings.synchronous}")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def _connect_writer(settings: DatabaseSettings) -> sqlite3.Connection:
    connection = connect(settings)
    # Savepoint and statement journals only roll back inside an open transaction (the WAL, not they,
    # makes commits durable): keep them in memory rather than in a temp file opened per batch.
    connection.execute("PRAGMA temp_store = MEMORY")
    return connection


def send_frame(sock: socket.socket, request_id: int, payload: bytes) -> None:
    sock.sendall(FRAME_HEADER.pack(len(payload), request_id) + payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        try:
            chunk = sock.recv(size - len(chunks))
        except OSError:  # the worker's end was reset: as good as closed
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    header = _recv_exactly(sock, FRAME_HEADER.size)
    if header is None:
        return None
    size, request_id = FRAME_HEADER.unpack(header)
    payload = _recv_exactly(sock, size)
    return None if payload is None else (request_id, payload)


def _unpickled_request(payload: bytes) -> tuple[Any, Outcome | None]:
    """The work sent, or the error to answer with when it cannot be unpickled here."""
    try:
        return pickle.loads(payload), None
    except Exception as error:
        unreadable = RuntimeError(f"the billing database process could not read the work sent: {error!r}")
        return None, Outcome(unreadable)


def picklable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError that names it."""
    return error if _pickles(error) else RuntimeError(f"{type(error).__name__}: {error}")


class _Server:
    """Writes and reads come on sockets of their own: the writer thread serves its socket itself (a batch
    the worker waits for, e.g. a reservation, crosses no thread hand-off here), and the main thread hands
    reads to the reader pool, so they never wait behind a batch."""

    def __init__(
        self, write_sock: socket.socket, read_sock: socket.socket, settings: DatabaseSettings
    ) -> None:
        self._write_sock = write_sock
        self._read_sock = read_sock
        self._settings = settings
        self._read_send_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_batches, name="billing-sqlite-writer")
        self._local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(
            max_workers=settings.readers, thread_name_prefix="billing-sqlite-reader",
            initializer=self._open_reader,
        )

    def run(self) -> None:
        self._writer.start()
        try:
            while (frame := _recv_frame(self._read_sock)) is not None:
                request_id, payload = frame
                self._readers.submit(self._read, request_id, payload)
        finally:  # the worker closed its ends (or died): finish what was sent, then stop
            self._writer.join()
            self._readers.shutdown(wait=True)
            with self._reader_lock:
                for connection in self._reader_connections:
                    connection.close()
            self._read_sock.close()

    @staticmethod
    def _reply(sock: socket.socket, request_id: int, answer: Any) -> None:
        try:
            payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # a result that does not pickle: its caller hears why
            payload = pickle.dumps(_unpicklable_answer(answer, error))
        try:
            send_frame(sock, request_id, payload)
        except OSError:  # the worker is gone; nobody is waiting for the answer
            pass

    # Reads.
    def _open_reader(self) -> None:
        connection = connect(self._settings)
        connection.execute("PRAGMA query_only = ON")
        self._local.connection = connection
        with self._reader_lock:
            self._reader_connections.append(connection)

    def _read(self, request_id: int, payload: bytes) -> None:
        work, outcome = _unpickled_request(payload)
        if outcome is None:
            try:
                outcome = Outcome(None, work(self._local.connection))
            except Exception as error:
                outcome = Outcome(picklable(error))
        with self._read_send_lock:
            self._reply(self._read_sock, request_id, outcome)

    # Writes.
    def _write_batches(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while (frame := _recv_frame(self._write_sock)) is not None:
                request_id, payload = frame
                batch, unreadable = _unpickled_request(payload)
                if unreadable is not None:  # the worker fails the whole batch with this error
                    self._reply(self._write_sock, request_id, unreadable)
                    continue
                notes: list[LogNote] = []
                try:
                    connection = connection or _connect_writer(self._settings)
                    outcomes = commit_batch(connection, batch, notes)
                except Exception as error:  # no connection: every caller hears why
                    notes.append(
                        LogNote(logging.ERROR, "billing database unavailable", {"error": repr(error)})
                    )
                    outcomes = [Outcome(picklable(error))] * len(batch)
                self._reply(self._write_sock, request_id, WriteAnswer(outcomes, notes))
        finally:
            if connection is not None:
                connection.close()
            self._write_sock.close()


def _unpicklable_answer(answer: Any, error: Exception) -> Any:
    failed = Outcome(RuntimeError(f"the billing database's answer could not be sent: {error!r}"))
    if isinstance(answer, WriteAnswer):
        outcomes = [o if o.error is not None or _pickles(o.result) else failed for o in answer.outcomes]
        return WriteAnswer(outcomes, answer.notes)
    return failed


def _pickles(value: Any) -> bool:
    """Whether `value` comes back out of a pickle (an exception whose constructor takes other arguments
    than its `args` dumps but does not load)."""
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True


def commit_batch(
    connection: sqlite3.Connection, batch: list[WriteJob], notes: list[LogNote]
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    try:
        connection.execute("BEGIN IMMEDIATE")
        for group in _groups(batch):
            if len(group) > 1 and _try_together(connection, group, outcomes):
                continue
            for job in group:
                _run_in_savepoint(connection, job, outcomes)
        connection.execute("COMMIT")
        _run_after_commit(batch, outcomes, notes)
    except Exception as batch_error:  # e.g. disk full or database locked: every caller hears of it
        notes.append(LogNote(logging.ERROR, "billing write batch failed",
                             {"batch": len(batch), "error": repr(batch_error)}))
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except Exception as rollback_error:  # the callers hear of the first error; the writer must go on
            notes.append(LogNote(logging.ERROR, "billing write batch could not be rolled back",
                                 {"error": repr(rollback_error)}))
        outcomes = [Outcome(picklable(batch_error))] * len(batch)
    return outcomes


def _run_after_commit(batch: list[WriteJob], outcomes: list[Outcome], notes: list[LogNote]) -> None:
    for job, outcome in zip(batch, outcomes, strict=True):
        if job.after_commit is not None and outcome.error is None:
            try:
                job.after_commit()
            except Exception as error:  # the commit stands; only the clean-up after it failed
                notes.append(
                    LogNote(logging.ERROR, "billing post-commit step failed", {"error": repr(error)})
                )


def _groups(batch: list[WriteJob]) -> Iterator[list[WriteJob]]:
    """Runs of consecutive items of the same kind; every other job alone. Order is kept."""
    group: list[WriteJob] = []
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


def _try_together(connection: sqlite3.Connection, group: list[WriteJob], outcomes: list[Outcome]) -> bool:
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
    outcomes.extend(Outcome(None, result) for result in results)
    return True


def _run_in_savepoint(connection: sqlite3.Connection, job: WriteJob, outcomes: list[Outcome]) -> None:
    connection.execute("SAVEPOINT job")
    try:
        outcomes.append(Outcome(None, job.run_alone(connection)))
    except Exception as job_error:  # that caller gets its error; the rest of the batch commits
        connection.execute("ROLLBACK TO job")
        outcomes.append(Outcome(picklable(job_error)))
    connection.execute("RELEASE job")


def main() -> None:
    """The database process's entry point: argv is the write and read sockets' file descriptors, then the
    settings."""
    write_fd, read_fd, path, synchronous, readers = sys.argv[1:6]
    # The work the worker sends is defined there: import it now rather than on the first request's unpickling.
    importlib.import_module("worker.billing.store.sqlite")
    serve(socket.socket(fileno=int(write_fd)), socket.socket(fileno=int(read_fd)),
          DatabaseSettings(Path(path), synchronous, int(readers)))


def serve(write_sock: socket.socket, read_sock: socket.socket, settings: DatabaseSettings) -> None:
    # The worker decides when this process ends (by closing the socket once its writes are in): a Ctrl-C
    # or a signal to the whole process group must not cut a batch off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _Server(write_sock, read_sock, settings).run()
