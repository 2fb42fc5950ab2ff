"""The usage outbox against a real HTTP receiver on 127.0.0.1 that fails every third attempt."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.billing.support import ledger_entry
from tests.support.worker_process import eventually
from worker.billing.outbox import UsageOutbox
from worker.billing.store import LedgerStore
from worker.billing.store.records import LedgerFilter, LedgerRecord


@dataclass
class Receiver:
    """A webhook that honours Idempotency-Key and answers 503 to every `fail_every`-th attempt."""

    fail_every: int = 3
    attempts: int = 0
    accepted: list[str] = field(default_factory=list)
    acknowledged_twice: list[str] = field(default_factory=list)
    authorizations: set[str] = field(default_factory=set)
    bodies: dict[str, dict] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        self.attempts += 1
        self.authorizations.add(headers.get("authorization", ""))
        status = 503 if self.attempts % self.fail_every == 0 else 200
        if status == 200:
            key = headers["idempotency-key"]
            if key in self.bodies:
                self.acknowledged_twice.append(key)
            else:
                self.accepted.append(key)
                self.bodies[key] = orjson.loads(body)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    app = Receiver()
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only then (else every answer waits on delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    assert await eventually(started, timeout_s=30)
    try:
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}/usage"
    finally:
        server.should_exit = True
        await task
        sock.close()


def outbox_for(store: LedgerStore, url: str) -> UsageOutbox:
    return UsageOutbox(
        store,
        "worker-1",
        url,
        token="hook-token",
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        poll_interval_s=0.05,
    )


async def delivered(outbox: UsageOutbox, receiver: Receiver, count: int) -> None:
    async def arrived() -> bool:
        return len(receiver.accepted) >= count and not outbox.pending

    assert await eventually(arrived, timeout_s=30)


async def test_records_arrive_in_order_once_and_delivery_resumes_after_restart(
    store: LedgerStore, receiver: tuple[Receiver, str]
) -> None:
    app, url = receiver
    first_ids = [f"rec-{i:03d}" for i in range(12)]
    for record_id in first_ids:
        await store.settle(ledger_entry(record_id, cost=11))
    await store.settle(ledger_entry("rec-of-another-worker", worker_id="worker-2"))

    outbox = outbox_for(store, url)
    await outbox.start()
    assert outbox.pending == 12
    await delivered(outbox, app, 12)
    await outbox.close()
    assert app.accepted == first_ids
    assert app.attempts > 12  # some deliveries failed and were retried
    assert await store.outbox_cursor("worker-1") == max(r.seq or 0 for r in await _all(store, "worker-1"))

    # Written while no outbox runs, delivered by the next one (as after a restart).
    later_ids = [f"rec-{i:03d}" for i in range(12, 20)]
    for record_id in later_ids:
        await store.settle(ledger_entry(record_id, cost=11))
    restarted = outbox_for(store, url)
    await restarted.start()
    assert restarted.pending == 8
    await delivered(restarted, app, 20)
    await restarted.close()

    assert app.accepted == first_ids + later_ids
    assert app.acknowledged_twice == []
    assert "rec-of-another-worker" not in app.accepted
    assert app.authorizations == {"Bearer hook-token"}
    body = app.bodies["rec-005"]
    assert body["object"] == "usage.record" and body["cost_usd"] == "0.000011" and body["cost_micro"] == 11
    assert (body["record_id"], body["request_id"]) == ("rec-005", "client-rec-005")


async def test_records_sharing_a_request_id_are_each_delivered_under_their_record_id(
    store: LedgerStore, receiver: tuple[Receiver, str]
) -> None:
    app, url = receiver
    app.fail_every = 1_000  # no failures: any copy acknowledged twice would be a dropped record
    record_ids = [f"rec-{i}" for i in range(3)]
    for record_id in record_ids:
        await store.settle(ledger_entry(record_id, request_id="client-reused"))
    outbox = outbox_for(store, url)
    await outbox.start()
    try:
        await delivered(outbox, app, 3)
    finally:
        await outbox.close()
    assert app.accepted == record_ids and app.acknowledged_twice == []
    assert [app.bodies[r]["request_id"] for r in record_ids] == ["client-reused"] * 3


async def test_new_records_are_delivered_while_running(
    store: LedgerStore, receiver: tuple[Receiver, str]
) -> None:
    app, url = receiver
    outbox = outbox_for(store, url)
    await outbox.start()
    try:
        for i in range(5):
            await store.settle(ledger_entry(f"rec-live-{i}"))
            outbox.notify()
        await delivered(outbox, app, 5)
    finally:
        await outbox.close()
    assert app.accepted == [f"rec-live-{i}" for i in range(5)]


async def test_an_unreachable_receiver_holds_records_back(store: LedgerStore,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/usage"
    await store.settle(ledger_entry("rec-waiting"))
    outbox = outbox_for(store, url)
    caplog.set_level(logging.WARNING, logger="worker.billing.outbox")

    async def retried_twice() -> bool:
        return sum(r.getMessage() == "usage webhook delivery failed; retrying" for r in caplog.records) >= 2

    await outbox.start()
    try:
        assert await eventually(retried_twice, timeout_s=10)  # it tried, and tried again
    finally:
        await outbox.close()
    assert outbox.pending == 1 and outbox.delivered == 0
    assert await store.outbox_cursor("worker-1") == 0


async def _all(store: LedgerStore, worker_id: str) -> list[LedgerRecord]:
    return await store.query_ledger(LedgerFilter(worker_id=worker_id), limit=1000, order="asc")
