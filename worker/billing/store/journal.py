"""A worker's ledger journal: each record is appended to a file before its batch reaches SQLite (docs/hot-path.md).

An append has the durability of SQLite's `synchronous=NORMAL` (it survives the process being killed, not a power
loss) for one write call. Each batch's records go to a file of their own, removed once the batch has committed.
Files a killed worker left behind are settled when a worker with the same worker id starts again; settling is
idempotent by record id, so a record whose file outlived its commit is still recorded and charged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from worker.billing.store.base import DuplicateRecordId
from worker.billing.store.records import LedgerEntry

logger = logging.getLogger(__name__)
# Journaled records reach SQLite in batches this far apart (or this large), not one commit per response:
# each commit costs the database process the WAL pages of seven b-trees, so fewer, larger ones cost less
# per record (reads of balances and the ledger, and shutdown, hand the waiting records over at once).
JOURNAL_FLUSH_S = 0.25
JOURNAL_BATCH_MAX = 256
# Settles ledger rows; each row's seq, None for a record id in the ledger already, or what failed it.
SettleRows = Callable[[list[tuple[Any, ...]]], Awaitable[Sequence[int | BaseException | None]]]

_SUFFIX = ".jsonl"
_LEDGER_WIDTH = len(LedgerEntry._fields)
_LEDGER_DEFAULTS = tuple(LedgerEntry._field_defaults.values())


class LedgerJournal:
    """Appended to from the event loop; `open` and `read` touch the disk more and run in a thread."""

    def __init__(self, directory: Path, next_number: int) -> None:
        self.directory = directory
        self._next_number = next_number
        self._fd: int | None = None
        self._path: Path | None = None

    @classmethod
    def open(cls, directory: Path) -> tuple[LedgerJournal, list[Path]]:
        """The journal in `directory` (made if missing) and the files left in it, oldest first."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        leftovers = sorted(directory.glob(f"*{_SUFFIX}"))
        numbers = [int(path.stem) for path in leftovers if path.stem.isdigit()]
        return cls(directory, max(numbers, default=0) + 1), leftovers

    def append(self, row: tuple[Any, ...]) -> None:
        """Make one ledger row survive the process being killed (one line, one write call)."""
        if self._fd is None:
            self._path = self.directory / f"{self._next_number:012d}{_SUFFIX}"
            self._next_number += 1
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        line = orjson.dumps(row) + b"\n"
        if os.write(self._fd, line) != len(line):  # a full disk; the caller reports the record as lost
            raise OSError(f"short write to the ledger journal {self._path}")

    def seal(self) -> Path | None:
        """End the current file: the rows appended so far go to the database as one batch."""
        path, fd = self._path, self._fd
        self._path = self._fd = None
        if fd is not None:
            os.close(fd)
        return path

    def close(self) -> None:
        self.seal()

    @staticmethod
    def read(path: Path) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                row = tuple(orjson.loads(line))
                # A record journaled by an older worker lacks the columns added since: their defaults.
                missing = _LEDGER_WIDTH - len(row)
                rows.append(row + _LEDGER_DEFAULTS[len(_LEDGER_DEFAULTS) - missing:] if missing > 0 else row)
            except orjson.JSONDecodeError:
                # Only a machine crash can tear a line, and only the last one; that record was not sent.
                logger.error(
                    "unreadable line in the ledger journal", extra={"file": str(path), "line": number}
                )
        return rows


class JournaledSettlements:
    """Ledger rows kept by a journal append at once, and handed to `settle_rows` in batches."""

    def __init__(self, journal: LedgerJournal, settle_rows: SettleRows) -> None:
        self._journal = journal
        self._settle_rows = settle_rows
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def keep(self, row: tuple[Any, ...]) -> asyncio.Future[int]:
        self._journal.append(row)
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[int] = loop.create_future()
        self._waiting.append((row, settled))
        if len(self._waiting) >= JOURNAL_BATCH_MAX:
            self._hand_over()
        elif self._flush is None:
            self._flush = loop.call_later(JOURNAL_FLUSH_S, self._hand_over)
        return settled

    async def flush(self) -> None:
        """Return once every row kept so far is settled (or has failed)."""
        self._hand_over()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        self._journal.close()

    def _hand_over(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        path = self._journal.seal()
        assert path is not None  # the batch's rows were appended to it
        task = asyncio.ensure_future(self._settle(batch, path))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _settle(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[int]]], path: Path) -> None:
        try:
            seqs = await self._settle_rows([row for row, _ in batch])
        except Exception as error:  # noqa: BLE001  each record's caller hears why; the file stays
            seqs = [error] * len(batch)
        for (row, settled), seq in zip(batch, seqs, strict=True):
            if isinstance(seq, BaseException):
                settled.set_exception(seq)
            elif seq is None:
                settled.set_exception(DuplicateRecordId(row[0]))
            else:
                settled.set_result(seq)
        if not any(isinstance(seq, BaseException) for seq in seqs):  # else the next start settles the file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # on the loop, like the appends: one system call on a local file
