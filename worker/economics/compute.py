"""The economics of a window, computed from the ledger's aggregates and the replicas' up-time (no I/O); what
each figure means is DEFINITIONS (also `worker economics --help`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal, NamedTuple

from pydantic import BaseModel

from worker.billing.money import micro_to_usd_text
from worker.billing.store.records import MICROS_PER_USD, ReplicaUptime, from_epoch
from worker.economics.queries import Bucket, ModelTotals

DEFINITIONS = """Definitions (per model, and for the node, model "*": every model together; every worker
recording into the database unless one is chosen):
- gpu_seconds: GPU time the ledger attributes to the window's requests (a request's share of its
  replica's busy time, times the replica's GPUs).
- gpu_hours_provisioned: sum over replica runs of their overlap with the window, times their GPUs; a run
  counts from its engine's start to its stop, or to its worker's last heartbeat when it never stopped.
- utilization: gpu_seconds / 3600 / gpu_hours_provisioned (null without provisioned time; on vLLM the
  attributed time is the worker's estimate).
- gpu_cost_usd: gpu_hours_provisioned x the model's gpu_hour_usd (the node's gpu_hour_usd is its cost per
  provisioned GPU-hour); margin_usd: revenue - GPU cost.
- break_even_usd_per_mtok: GPU cost per million tokens (prompt + completion) served, at the observed
  mix and load (null without tokens).
- peak_tokens_per_gpu_hour: the highest tokens (prompt + completion, counted in the minute each request
  was received) per provisioned GPU-hour of any whole UTC minute in the window with provisioned time;
  break_even_usd_per_mtok_at_peak: the GPU cost per million tokens had the model run all its provisioned
  time at that rate (null without such a minute).
- openrouter_byok_fee_usd: 5% of the cost of requests made with BYOK keys past the account's first
  1,000,000 BYOK requests of the calendar month (UTC).
- target prices (with a target margin M): the prompt and completion prices per million tokens at which
  the window's tokens would have earned GPU cost / (1 - M), in the model's configured prompt:completion
  price ratio (1:1 for an unpriced model); cached-token discounts and per-request prices are left out.
  Per model only; null where no tokens were served.
"""

BYOK_FEE_RATE = Decimal("0.05")
PEAK_BUCKET_S = 60
NODE = "*"  # the node's row: every model together
_MICRO = Decimal("0.000001")
_TOKENS_PER_MTOK = Decimal(1_000_000)


class ModelPrices(NamedTuple):
    gpu_hour_usd: Decimal
    prompt_per_mtok: Decimal  # the configured token prices: only their ratio is used
    completion_per_mtok: Decimal


class Economics(BaseModel):
    model: str
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    revenue_usd: str
    gpu_seconds: float
    gpu_hours_provisioned: float
    utilization: float | None
    gpu_hour_usd: str | None  # the node's: its GPU cost per provisioned hour, null without provisioned time
    gpu_cost_usd: str
    margin_usd: str
    break_even_usd_per_mtok: str | None
    peak_tokens_per_gpu_hour: float | None
    break_even_usd_per_mtok_at_peak: str | None
    openrouter_byok_fee_usd: str
    target_prompt_usd_per_mtok: str | None = None
    target_completion_usd_per_mtok: str | None = None


class EconomicsReport(BaseModel):
    object: Literal["economics.report"] = "economics.report"
    since: datetime
    until: datetime
    worker_id: str | None  # None: every worker recording into the database
    target_margin: str | None
    models: list[Economics]
    node: Economics


def overlap_s(run: ReplicaUptime, start: float, end: float) -> float:
    """Seconds of [start, end) the run covers: from its start to its stop, else to its last heartbeat."""
    run_end = run.stopped_at if run.stopped_at is not None else run.seen_at
    return max(0.0, min(run_end, end) - max(run.started_at, start))


def provisioned_gpu_s(runs: Iterable[ReplicaUptime], start: float, end: float) -> float:
    return sum(overlap_s(run, start, end) * run.gpus for run in runs)


def peak_tokens_per_gpu_hour(
    buckets: Iterable[Bucket], runs: Sequence[ReplicaUptime], since: float, until: float
) -> float | None:
    """The highest tokens per provisioned GPU-hour over the minute buckets that had provisioned time."""
    rates = []
    for bucket in buckets:
        start, end = max(bucket.start, since), min(bucket.start + PEAK_BUCKET_S, until)
        gpu_hours = provisioned_gpu_s(runs, start, end) / 3600
        if gpu_hours > 0:
            rates.append(bucket.tokens / gpu_hours)
    return max(rates, default=None)


def _usd(amount: Decimal) -> str:
    return str(amount.quantize(_MICRO, rounding=ROUND_HALF_UP))


def _exact(value: float) -> Decimal:
    return Decimal(repr(value))


def target_prices(
    gpu_cost: Decimal, margin: Decimal, prompt_tokens: int, completion_tokens: int, prices: ModelPrices
) -> tuple[str, str] | None:
    """Prompt and completion USD per million tokens that make margin / revenue = `margin` (0 <= margin < 1)
    at this token mix, in the configured prompt:completion price ratio (1:1 when both are 0)."""
    prompt_weight, completion_weight = prices.prompt_per_mtok, prices.completion_per_mtok
    if prompt_weight == 0 and completion_weight == 0:
        prompt_weight = completion_weight = Decimal(1)
    weighted_mtok = (prompt_weight * prompt_tokens + completion_weight * completion_tokens) / _TOKENS_PER_MTOK
    if weighted_mtok == 0:
        return None
    scale = gpu_cost / (1 - margin) / weighted_mtok
    return _usd(scale * prompt_weight), _usd(scale * completion_weight)


def economics_of(
    model: str, totals: ModelTotals, gpu_s_provisioned: float, gpu_cost: Decimal, peak: float | None,
    byok_fee_base_micro: int, *, gpu_hour_usd: Decimal | None,
) -> Economics:
    gpu_hours = gpu_s_provisioned / 3600
    tokens = totals.prompt_tokens + totals.completion_tokens
    revenue = Decimal(totals.revenue_micro) / MICROS_PER_USD
    at_peak = None
    if peak is not None and peak > 0 and gpu_hours > 0:
        at_peak = _usd(gpu_cost / (_exact(peak) * _exact(gpu_hours)) * _TOKENS_PER_MTOK)
    return Economics(
        model=model, requests=totals.requests, prompt_tokens=totals.prompt_tokens,
        cached_prompt_tokens=totals.cached_prompt_tokens, completion_tokens=totals.completion_tokens,
        revenue_usd=micro_to_usd_text(totals.revenue_micro), gpu_seconds=round(totals.gpu_seconds, 6),
        gpu_hours_provisioned=round(gpu_hours, 6),
        utilization=round(totals.gpu_seconds / gpu_s_provisioned, 6) if gpu_s_provisioned > 0 else None,
        gpu_hour_usd=None if gpu_hour_usd is None else str(gpu_hour_usd),
        gpu_cost_usd=_usd(gpu_cost), margin_usd=_usd(revenue - gpu_cost),
        break_even_usd_per_mtok=_usd(gpu_cost / tokens * _TOKENS_PER_MTOK) if tokens else None,
        peak_tokens_per_gpu_hour=None if peak is None else round(peak, 3),
        break_even_usd_per_mtok_at_peak=at_peak,
        # 5% of a micro-USD amount is exact to 1e-8 USD.
        openrouter_byok_fee_usd=format((Decimal(byok_fee_base_micro) * BYOK_FEE_RATE / MICROS_PER_USD).quantize(
            Decimal("0.00000001")), "f"),
    )


def report(
    since: float, until: float, totals: Mapping[str, ModelTotals], runs: Sequence[ReplicaUptime],
    minute_buckets: Sequence[Bucket], byok_fee_base: Mapping[str, int], prices: Mapping[str, ModelPrices],
    *, default_prices: ModelPrices, target_margin: Decimal | None = None, only_model: str | None = None,
    worker_id: str | None = None,
) -> EconomicsReport:
    """The window's economics per model (every model with records, up-time or configuration) and for the node."""
    names = sorted({*totals, *(run.model for run in runs), *prices})
    if only_model is not None:
        names = [name for name in names if name == only_model]
    zero = ModelTotals(0, 0, 0, 0, 0, 0.0)
    rows: list[Economics] = []
    node_cost = Decimal(0)
    for name in names:
        price = prices.get(name, default_prices)
        own_runs = [run for run in runs if run.model == name]
        gpu_s = provisioned_gpu_s(own_runs, since, until)
        cost = _exact(gpu_s) / 3600 * price.gpu_hour_usd
        node_cost += cost
        own = totals.get(name, zero)
        peak = peak_tokens_per_gpu_hour((b for b in minute_buckets if b.model == name), own_runs, since, until)
        row = economics_of(name, own, gpu_s, cost, peak, byok_fee_base.get(name, 0), gpu_hour_usd=price.gpu_hour_usd)
        if target_margin is not None:
            target = target_prices(cost, target_margin, own.prompt_tokens, own.completion_tokens, price)
            if target is not None:
                row.target_prompt_usd_per_mtok, row.target_completion_usd_per_mtok = target
        rows.append(row)
    node_runs = [run for run in runs if run.model in names]
    node_gpu_s = provisioned_gpu_s(node_runs, since, until)
    node_totals = ModelTotals(*(sum(getattr(totals.get(name, zero), field) for name in names)
                                for field in ModelTotals._fields))
    node_buckets: dict[float, int] = defaultdict(int)
    for bucket in minute_buckets:
        if bucket.model in names:
            node_buckets[bucket.start] += bucket.tokens
    node_peak = peak_tokens_per_gpu_hour(
        (Bucket(NODE, start, tokens, 0, 0.0) for start, tokens in node_buckets.items()), node_runs, since, until)
    node = economics_of(
        NODE, node_totals, node_gpu_s, node_cost, node_peak, sum(byok_fee_base.get(name, 0) for name in names),
        gpu_hour_usd=(node_cost / (_exact(node_gpu_s) / 3600)).quantize(_MICRO) if node_gpu_s > 0 else None,
    )
    return EconomicsReport(
        since=from_epoch(since), until=from_epoch(until), worker_id=worker_id,
        target_margin=None if target_margin is None else str(target_margin), models=rows, node=node,
    )
