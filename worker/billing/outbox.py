"""Delivers this worker's ledger records, in order, to a usage webhook.

One POST per record, JSON body, `Idempotency-Key: <record id>` (the worker's own unique id for the
request, never the client's x-request-id, which may repeat). A record is retried (capped exponential
backoff with jitter) until the receiver answers 2xx; only then does the cursor stored in the database
move past it, so a restart resumes where delivery stopped. A record can be sent twice only when the
worker stops between the receiver's 2xx and the cursor write; the idempotency key lets the receiver
drop that copy. A record the receiver keeps refusing holds back the ones after it (see `pending`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from worker.billing.export import record_json
from worker.billing.store import LedgerStore
from worker.billing.store.records import LedgerFilter, LedgerRecord

logger = logging.getLogger(__name__)
_PAGE_SIZE = 100


class DeliveryRefused(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"the usage webhook answered HTTP {status_code}")
        self.status_code = status_code


class UsageOutbox:
    def __init__(
        self,
        store: LedgerStore,
        worker_id: str,
        url: str,
        *,
        token: str | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 60.0,
        poll_interval_s: float = 5.0,
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._where = LedgerFilter(worker_id=worker_id)
        self._url = url
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        self._backoff = wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s) + wait_random(
            0, backoff_initial_s
        )
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._cursor = 0
        self._pending = 0
        self._delivered = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records written but not yet acknowledged by the receiver (as of the last check)."""
        return self._pending

    @property
    def delivered(self) -> int:
        """Records acknowledged since this outbox started."""
        return self._delivered

    async def start(self) -> None:
        self._cursor = await self._store.outbox_cursor(self._worker_id)
        self._pending = await self._store.count_ledger(self._where, after_seq=self._cursor)
        self._task = asyncio.create_task(self._run(), name="billing-outbox")

    def notify(self) -> None:
        """New records were committed: look now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                records = await self._store.query_ledger(
                    self._where, limit=_PAGE_SIZE, order="asc", cursor=self._cursor
                )
                self._pending = await self._store.count_ledger(self._where, after_seq=self._cursor)
                for record in records:
                    await self._deliver(record)
                    assert record.seq is not None
                    await self._store.advance_outbox(self._worker_id, record.seq, time.time())
                    self._cursor = record.seq
                    self._pending = max(0, self._pending - 1)
                    self._delivered += 1
                failures = 0
            except Exception as error:  # noqa: BLE001  the database is unreachable: keep trying, loudly
                failures += 1
                logger.error("usage outbox cannot read the ledger", extra={"error": repr(error)})
                await asyncio.sleep(min(60.0, 0.5 * 2 ** min(failures, 7)))
                continue
            if len(records) < _PAGE_SIZE:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)

    async def _deliver(self, record: LedgerRecord) -> None:
        body = orjson.dumps(record_json(record))
        headers = {**self._headers, "idempotency-key": record.record_id}
        retrying = AsyncRetrying(
            wait=self._backoff,
            retry=retry_if_exception_type((httpx.HTTPError, DeliveryRefused)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                response = await self._client.post(self._url, content=body, headers=headers)
                if not response.is_success:
                    raise DeliveryRefused(response.status_code)

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "usage webhook delivery failed; retrying",
            extra={
                "attempt": state.attempt_number,
                "error": str(error),
                "pending": self._pending,
                "retry_in_s": round(state.upcoming_sleep, 2),
            },
        )
