"""The window in time buckets, for the plot: revenue and GPU cost of the node, utilisation per model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import NamedTuple

from worker.billing.store.records import MICROS_PER_USD, ReplicaUptime
from worker.economics.compute import ModelPrices, provisioned_gpu_s
from worker.economics.queries import Bucket

# About this many buckets in a window at most, in one of these widths. A request counts in the bucket it was
# received in, so buckets much shorter than requests would show utilisation in bursts above 100%.
MAX_BUCKETS = 240
BUCKET_WIDTHS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)


class Point(NamedTuple):
    start: float  # epoch seconds; the first and last buckets are cut to the window
    end: float
    revenue_usd: float  # in the bucket; for a plot, where a float is plenty
    gpu_cost_usd: float
    utilization: dict[str, float | None]  # per model: attributed / provisioned GPU time in the bucket


def bucket_width_s(since: float, until: float) -> int:
    span = until - since
    return next((width for width in BUCKET_WIDTHS_S if span / width <= MAX_BUCKETS), BUCKET_WIDTHS_S[-1])


def timeline(
    since: float, until: float, width_s: int, buckets: Sequence[Bucket], runs: Sequence[ReplicaUptime],
    prices: Mapping[str, ModelPrices], default_prices: ModelPrices, models: Sequence[str],
) -> list[Point]:
    by_start: dict[float, list[Bucket]] = defaultdict(list)
    for bucket in buckets:
        if bucket.model in models:
            by_start[bucket.start] += [bucket]
    points = []
    start = since - since % width_s
    while start < until:
        lo, hi = max(start, since), min(start + width_s, until)
        revenue_micro = sum(b.revenue_micro for b in by_start.get(start, ()))
        cost = Decimal(0)
        utilization: dict[str, float | None] = {}
        for model in models:
            gpu_s = provisioned_gpu_s((r for r in runs if r.model == model), lo, hi)
            cost += Decimal(repr(gpu_s)) / 3600 * prices.get(model, default_prices).gpu_hour_usd
            used = sum(b.gpu_seconds for b in by_start.get(start, ()) if b.model == model)
            utilization[model] = used / gpu_s if gpu_s > 0 else None
        points.append(Point(lo, hi, revenue_micro / MICROS_PER_USD, float(cost), utilization))
        start += width_s
    return points
