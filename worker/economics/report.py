"""One economics report: the store's aggregates for a window, priced with the node's configuration."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from worker.billing.store import LedgerStore
from worker.billing.store.records import to_epoch
from worker.config import ModelConfig, NodeConfig
from worker.economics.compute import PEAK_BUCKET_S, EconomicsReport, ModelPrices, report
from worker.economics.queries import (
    BYOK_FREE_REQUESTS_PER_MONTH,
    byok_fee_base,
    model_buckets,
    model_totals,
    uptime_runs,
)
from worker.economics.timeline import Point, bucket_width_s, timeline


def model_prices(config: NodeConfig, model: ModelConfig) -> ModelPrices:
    own = model.gpu_hour_usd
    return ModelPrices(config.worker.gpu_hour_usd if own is None else own, model.pricing.prompt_per_mtok,
                       model.pricing.completion_per_mtok)


async def economics_report(
    store: LedgerStore, config: NodeConfig, since: datetime, until: datetime, *, model: str | None = None,
    worker_id: str | None = None, target_margin: Decimal | None = None,
    byok_allowance: int = BYOK_FREE_REQUESTS_PER_MONTH,
) -> EconomicsReport:
    """`worker_id`: only that worker's records and replicas (a database several workers share); None: all."""
    start, end = to_epoch(since), to_epoch(until)
    return report(
        start, end, await model_totals(store, start, end, worker_id), await uptime_runs(store, start, end, worker_id),
        await model_buckets(store, start, end, PEAK_BUCKET_S, worker_id),
        await byok_fee_base(store, start, end, worker_id, allowance=byok_allowance),
        {m.id: model_prices(config, m) for m in config.models},
        default_prices=ModelPrices(config.worker.gpu_hour_usd, Decimal(0), Decimal(0)),
        target_margin=target_margin, only_model=model, worker_id=worker_id,
    )


async def economics_timeline(
    store: LedgerStore, config: NodeConfig, since: datetime, until: datetime, *, model: str | None = None,
    worker_id: str | None = None,
) -> tuple[list[str], list[Point]]:
    """The models shown and the window in time buckets (see worker.economics.timeline)."""
    start, end = to_epoch(since), to_epoch(until)
    width = bucket_width_s(start, end)
    buckets = await model_buckets(store, start, end, width, worker_id)
    runs = await uptime_runs(store, start, end, worker_id)
    names = sorted({*(b.model for b in buckets), *(r.model for r in runs), *(m.id for m in config.models)})
    models = [name for name in names if model is None or name == model]
    prices = {m.id: model_prices(config, m) for m in config.models}
    default = ModelPrices(config.worker.gpu_hour_usd, Decimal(0), Decimal(0))
    return models, timeline(start, end, width, buckets, runs, prices, default, models)
