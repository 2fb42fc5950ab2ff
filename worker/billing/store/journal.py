"""A worker's ledger journal: each record is appended to a file before its batch reaches SQLite.

With SQLite's default `synchronous=NORMAL` a commit survives the process being killed but not a power
loss. An append to a file (into the page cache) has exactly that durability, costs one write call and no
hand-over to the writer thread; so a response can end as soon as its record is appended, and records
reach SQLite later in fewer, larger commits. Each batch's records go to a file of their own, removed once
the batch has committed. Files that a killed worker left behind are settled when a worker with the same
worker id starts again; settling is idempotent by record id, so a record that was committed and whose
file outlived the commit is still recorded and charged once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

from worker.billing.store.records import LedgerEntry

logger = logging.getLogger(__name__)

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
