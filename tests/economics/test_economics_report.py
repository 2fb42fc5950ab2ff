"""The economics of a hand-checked window, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tests.billing.support import make_key
from tests.economics.support import SINCE, T0, UNTIL, entry, node_config, run, write_window
from worker.billing.store import LedgerStore
from worker.billing.store.records import to_epoch
from worker.economics.compute import NODE, ModelPrices, report, target_prices
from worker.economics.queries import Bucket, ModelTotals, byok_fee_base, months
from worker.economics.report import economics_report


async def test_each_model_and_the_node_as_computed_by_hand(store: LedgerStore) -> None:
    await write_window(store)
    report = await economics_report(store, node_config(), SINCE, UNTIL, target_margin=Decimal("0.25"))
    chat, big = (next(m for m in report.models if m.model == name) for name in ("acme/chat", "acme/big"))
    assert chat.model_dump() == {
        "model": "acme/chat", "requests": 3, "prompt_tokens": 6000, "cached_prompt_tokens": 200,
        "completion_tokens": 2000, "revenue_usd": "0.010000", "gpu_seconds": 5.0,
        "gpu_hours_provisioned": 0.75,  # 30 min before the restart, 15 min after it until the last heartbeat
        "utilization": 0.001852,  # 5 s / 2700 GPU-s
        "gpu_hour_usd": "2.00", "gpu_cost_usd": "1.500000", "margin_usd": "-1.490000",
        "break_even_usd_per_mtok": "187.500000",  # 1.50 USD / 8000 tokens
        # The busiest minute: 6000 tokens in 1/60 GPU-hour.
        "peak_tokens_per_gpu_hour": 360000.0, "break_even_usd_per_mtok_at_peak": "5.555556",
        "openrouter_byok_fee_usd": "0.00000000",
        # 2.00 USD of revenue (margin 25% of 1.50 USD of GPUs) from 6000 + 2000 tokens at 1:2.
        "target_prompt_usd_per_mtok": "200.000000", "target_completion_usd_per_mtok": "400.000000",
    }
    assert (big.gpu_hours_provisioned, big.utilization, big.gpu_cost_usd, big.margin_usd) == (
        2.0, 0.004167, "6.000000", "-5.980000")
    assert (big.break_even_usd_per_mtok, big.peak_tokens_per_gpu_hour, big.break_even_usd_per_mtok_at_peak) == (
        "300.000000", 600000.0, "5.000000")
    assert (big.target_prompt_usd_per_mtok, big.target_completion_usd_per_mtok) == ("200.000000", "600.000000")
    node = report.node
    assert node.model == NODE
    assert (node.requests, node.prompt_tokens, node.completion_tokens, node.revenue_usd, node.gpu_seconds) == (
        4, 16_000, 12_000, "0.030000", 35.0)
    assert (node.gpu_hours_provisioned, node.gpu_cost_usd, node.margin_usd, node.gpu_hour_usd) == (
        2.75, "7.500000", "-7.470000", "2.727273")
    assert node.utilization == round(35 / 9900, 6)
    assert node.break_even_usd_per_mtok == "267.857143"  # 7.50 USD / 28000 tokens
    # The busiest minute of the node: big's 20000 tokens in (1 GPU-min of chat + 2 of big) = 1/20 GPU-hour.
    assert node.peak_tokens_per_gpu_hour == 400000.0
    assert node.break_even_usd_per_mtok_at_peak == "6.818182"  # 7.50 / (400000 x 2.75) x 1e6
    assert node.target_prompt_usd_per_mtok is None


async def test_one_model_and_an_empty_window(store: LedgerStore) -> None:
    await write_window(store)
    only = await economics_report(store, node_config(), SINCE, UNTIL, model="acme/big")
    assert [m.model for m in only.models] == ["acme/big"]
    assert (only.node.requests, only.node.gpu_hours_provisioned) == (1, 2.0)
    empty = await economics_report(store, node_config(), datetime(2020, 1, 1, tzinfo=UTC),
                                   datetime(2020, 2, 1, tzinfo=UTC), target_margin=Decimal("0.5"))
    for row in (*empty.models, empty.node):
        assert (row.requests, row.revenue_usd, row.gpu_cost_usd, row.margin_usd) == (0, "0.000000", "0.000000",
                                                                                      "0.000000")
        assert row.utilization is None and row.break_even_usd_per_mtok is None
        assert row.break_even_usd_per_mtok_at_peak is None and row.target_prompt_usd_per_mtok is None


async def test_the_byok_fee_starts_past_the_months_allowance_and_resets_each_month(store: LedgerStore) -> None:
    byok = await make_key(store, byok=True)
    other_byok = await make_key(store, byok=True)
    plain = await make_key(store)
    november, december = to_epoch(datetime(2026, 11, 1, tzinfo=UTC)), to_epoch(datetime(2026, 12, 1, tzinfo=UTC))
    for record in (
        entry("nov-1", november + 10, 1, 1, 100, 0.0, key=byok.key),  # before the window: counts to the allowance
        entry("nov-2", T0 - 100, 1, 1, 200, 0.0, key=byok.key),
        entry("nov-3", T0 + 100, 1, 1, 400, 0.0, key=byok.key),  # past an allowance of 2: 5% of 400
        entry("nov-4", T0 + 200, 1, 1, 800, 0.0, key=byok.key, model="acme/big"),
        entry("nov-plain", T0 + 300, 1, 1, 10_000, 0.0, key=plain.key),  # not BYOK
        entry("nov-other", T0 + 400, 1, 1, 5000, 0.0, key=other_byok.key),  # another account's first
        entry("dec-1", december + 1, 1, 1, 1000, 0.0, key=byok.key),  # a new month: a new allowance
        entry("dec-2", december + 2, 1, 1, 2000, 0.0, key=byok.key),
        entry("dec-3", december + 3, 1, 1, 3000, 0.0, key=byok.key),
    ):
        await store.settle(record)
    assert await byok_fee_base(store, T0, T0 + 3600, allowance=2) == {"acme/chat": 400, "acme/big": 800}
    assert await byok_fee_base(store, T0, december + 3600, allowance=2) == {"acme/chat": 3400, "acme/big": 800}
    assert await byok_fee_base(store, november, december + 3600) == {}
    report = await economics_report(store, node_config(), SINCE, UNTIL, byok_allowance=2)
    fees = {row.model: row.openrouter_byok_fee_usd for row in (*report.models, report.node)}
    assert fees == {"acme/chat": "0.00002000", "acme/big": "0.00004000", "*": "0.00006000"}


def test_months_are_calendar_months_in_utc() -> None:
    start = to_epoch(datetime(2026, 11, 20, tzinfo=UTC))
    spans = months(start, to_epoch(datetime(2027, 1, 2, tzinfo=UTC)))
    assert [datetime.fromtimestamp(s, UTC).date().isoformat() for s, _ in spans] == [
        "2026-11-01", "2026-12-01", "2027-01-01"]
    assert spans[0][1] == spans[1][0]


def test_tokens_without_provisioned_gpus_and_an_unpriced_model() -> None:
    """An external engine's model: requests and tokens but no GPUs of ours; unpriced: target prices 1:1."""
    totals = {"outside": ModelTotals(2, 3000, 0, 1000, 0, 0.0)}
    unpriced = ModelPrices(Decimal("2.00"), Decimal(0), Decimal(0))
    result = report(0.0, 3600.0, totals, [], [Bucket("outside", 0.0, 4000, 0, 0.0)], {}, {"outside": unpriced},
                    default_prices=unpriced, target_margin=Decimal("0.5"))
    (row,) = result.models
    assert (row.gpu_hours_provisioned, row.utilization, row.gpu_cost_usd, row.margin_usd) == (0.0, None, "0.000000",
                                                                                              "0.000000")
    assert (row.break_even_usd_per_mtok, row.peak_tokens_per_gpu_hour, row.break_even_usd_per_mtok_at_peak) == (
        "0.000000", None, None)
    assert (row.target_prompt_usd_per_mtok, row.target_completion_usd_per_mtok) == ("0.000000", "0.000000")
    assert result.node.gpu_hour_usd is None


def test_target_prices_keep_the_configured_ratio_or_fall_back_to_one_to_one() -> None:
    cost, margin = Decimal("3.00"), Decimal("0.4")  # revenue wanted: 5.00 USD
    assert target_prices(cost, margin, 1_000_000, 1_000_000, ModelPrices(Decimal(1), Decimal(0), Decimal(0))) == (
        "2.500000", "2.500000")
    assert target_prices(cost, margin, 1_000_000, 1_000_000, ModelPrices(Decimal(1), Decimal(0), Decimal(4))) == (
        "0.000000", "5.000000")  # prompts free as configured: completions carry it all
    assert target_prices(cost, margin, 1_000_000, 0, ModelPrices(Decimal(1), Decimal(0), Decimal(4))) is None
    assert target_prices(cost, Decimal(0), 0, 0, ModelPrices(Decimal(1), Decimal(1), Decimal(2))) is None


async def test_one_worker_of_a_shared_database(store: LedgerStore) -> None:
    """Records and replicas of another worker count for the database, not for this worker; the BYOK
    allowance counts the account's requests on every worker."""
    await write_window(store)
    byok = await make_key(store, byok=True)
    await store.settle(entry("other-1", T0 + 5, 500, 500, 7000, 4.0, key=byok.key)._replace(worker_id="node-2"))
    await store.settle(entry("mine-1", T0 + 6, 100, 100, 800, 1.0, key=byok.key))
    await store.save_replica_uptime([run("acme-chat-0", "acme/chat", 1, T0, None, T0 + 3600)._replace(
        worker_id="node-2")])
    mine = await economics_report(store, node_config(), SINCE, UNTIL, worker_id="node-1", byok_allowance=1)
    chat = next(m for m in mine.models if m.model == "acme/chat")
    assert mine.worker_id == "node-1"
    assert (chat.requests, chat.revenue_usd, chat.gpu_hours_provisioned) == (4, "0.010800", 0.75)
    assert chat.openrouter_byok_fee_usd == "0.00004000"  # the account's 2nd BYOK request: 5% of 800
    everyone = await economics_report(store, node_config(), SINCE, UNTIL, byok_allowance=1)
    chat = next(m for m in everyone.models if m.model == "acme/chat")
    assert (chat.requests, chat.revenue_usd, chat.gpu_hours_provisioned) == (5, "0.017800", 1.75)
    assert everyone.worker_id is None
