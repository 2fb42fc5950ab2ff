"""Billing backlogs: ledger writes not yet committed and usage records not yet delivered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class BillingCollector(Collector):
    def __init__(self, backlog: Callable[[], Any | None]) -> None:
        self.backlog = backlog  # returns BillingBacklog, or None before billing is open

    def collect(self) -> Iterator[Metric]:
        backlog = self.backlog()
        ledger = GaugeMetricFamily("worker_ledger_backlog", "Ledger records waiting for their batch to commit")
        outbox = GaugeMetricFamily("worker_outbox_backlog",
                                   "Ledger records not yet delivered to the usage webhook (0 without one)")
        held = GaugeMetricFamily("worker_balance_reservations_held",
                                 "Requests holding a balance reservation on this worker")
        if backlog is not None:
            ledger.add_metric([], backlog.ledger_writes_queued)
            outbox.add_metric([], backlog.outbox_pending or 0)
            held.add_metric([], backlog.reservations_held)
        yield ledger
        yield outbox
        yield held
