"""Group commit, for both stores (docs/hot-path.md): writes submitted on the event loop are committed in batches.

One batch is committed at a time; what callers submit meanwhile goes as the next batch. Every caller's future
resolves once its batch has committed, or with the error that failed its own write (a store's `commit` reports
one outcome per item).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
logger = logging.getLogger(__name__)

# Commits a batch in one transaction; returns each item's result, or the exception that failed that item.
MAX_BATCH = 256
CommitBatch = Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]]


class GroupCommit(Generic[Item, Result]):
    """Used from the one event loop that created it."""

    def __init__(self, commit: CommitBatch[Item, Result]) -> None:
        self._commit = commit
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._sender = asyncio.ensure_future(self._send_batches())

    @property
    def pending(self) -> int:
        """Writes submitted and not yet committed."""
        return len(self._waiting) + self._in_flight

    def submit(self, item: Item) -> asyncio.Future[Result]:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._wake.set()
        return future

    async def close(self) -> None:
        """Commit everything submitted so far, then stop."""
        self._closed = True
        self._wake.set()
        await self._sender

    async def _send_batches(self) -> None:
        while not (self._closed and not self._waiting):
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                self._in_flight = len(batch)
                await self._commit_batch(batch)
                self._in_flight = 0

    async def _commit_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            outcomes = await self._commit([item for item, _ in batch])
        except Exception as error:  # noqa: BLE001  nothing of the batch committed: every caller hears why
            logger.error("billing write batch failed", extra={"batch": len(batch), "error": repr(error)})
            outcomes = [error] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller stopped waiting; the write itself has happened regardless
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
