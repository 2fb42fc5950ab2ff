"""The ledger benchmark's page, rendered from canned results (no load is sent)."""

from __future__ import annotations

import datetime

from bench.common import CpuPerRequest, LoadShape
from bench.ledger import LedgerRow, render_report
from tests.bench.bench_support import canned_result, table


def test_the_ledger_cost_is_pooled_paired_and_shown_with_its_spread() -> None:
    row = LedgerRow("mock", 8, requests_per_run=192)
    for on, off in [(9_000, 10_000), (9_500, 10_000), (10_500, 10_000)]:  # costs +10%, +5%, -5%
        row.paths["ledger_on"].add(canned_result(on, 12.0))
        row.paths["ledger_off"].add(canned_result(off, 10.0))
    row.worker_cpu.update(ledger_on=CpuPerRequest(0.6, 200), ledger_off=CpuPerRequest(0.5, 200))
    row.off_loop_cpu.update(ledger_on=CpuPerRequest(0.01, 200), ledger_off=CpuPerRequest(0.0002, 200))

    page = render_report([row], LoadShape(128, 128, rounds=3, scale=4.0),
                         datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC), (0.5, 1.0),
                         ".venv/bin/python -m bench.ledger --rounds 3")

    assert "`.venv/bin/python -m bench.ledger --rounds 3`" in page
    (shown,) = table(page)  # no runs with synchronous=FULL here: only the default's row
    assert shown["ledger"] == "on (default, synchronous=NORMAL)"
    assert shown["cost (paired median)"] == "+5.0%"
    assert shown["per-round cost, min .. max"] == "-5.0% .. +10.0%"
    assert shown["rounds the ledger-on worker was faster"] == "1 of 3"
    assert shown["worker CPU ms per request, off / on"] == "2.50 / 3.00"
    assert shown["of which outside the event loop thread, off / on"] == "0.001 / 0.050"
    assert (shown["TTFT p50 off"], shown["TTFT p50 on"]) == ("10.0", "12.0")
    assert shown["tok/s ledger off"] == "10,000"
