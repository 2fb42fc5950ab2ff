"""Workload economics as it happens: what the requests were charged and the GPU time they used, against
the GPUs the replicas hold and what a GPU-hour costs.

The counters grow when a request ends (from its context, in the worker process, relayed requests
included); the gauges are read from the configuration and the replicas at scrape time. The Grafana row
"Workload economics" divides them into revenue, GPU cost, margin, utilisation and break-even per hour;
`worker economics` computes the same over the ledger for any window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.config import ModelConfig, NodeConfig
from worker.engines.replica import Replica, ReplicaState
from worker.gateway.context import RequestContext

_MICRO_PER_USD = 1_000_000

# The states in which a replica holds its GPUs: from its engine's start until it is stopped. A replica
# whose port is taken has not started an engine yet, and a stopped one has let its GPUs go.
HOLDING_GPUS = frozenset({ReplicaState.starting, ReplicaState.ready, ReplicaState.unhealthy,
                          ReplicaState.restarting})

# The request's charge in micro-dollars, as the ledger records it (billing's pricing, passed in by the node).
ChargeOf = Callable[[RequestContext], int]
# Each replica's busy seconds so far (time with at least one request in flight), by replica id.
BusySeconds = Callable[[], Mapping[str, float]]


class RequestEconomics:
    """Revenue and attributed GPU seconds by model, counted once per finished request."""

    def __init__(self, registry: CollectorRegistry, charge_micro: ChargeOf) -> None:
        self.charge_micro = charge_micro
        self.revenue = Counter("worker_revenue_usd", "What finished requests were charged, in USD (the ledger's "
                               "cost at the model's prices)", ["model"], registry=registry)
        self.gpu_seconds = Counter("worker_gpu_seconds_attributed",
                                   "GPU seconds attributed to finished requests (share of their replica's busy "
                                   "time x its GPUs)", ["model"], registry=registry)

    def observe(self, ctx: RequestContext) -> None:
        model = ctx.model.id
        cost = self.charge_micro(ctx)
        if cost:
            self.revenue.labels(model).inc(cost / _MICRO_PER_USD)
        if ctx.gpu_seconds:
            self.gpu_seconds.labels(model).inc(ctx.gpu_seconds)


def gpu_hour_usd(config: NodeConfig, model: ModelConfig) -> Decimal:
    """What one of the model's GPUs costs per hour: its own price, else the worker's."""
    return model.gpu_hour_usd if model.gpu_hour_usd is not None else config.worker.gpu_hour_usd


class EconomicsCollector(Collector):
    """The configured GPU-hour price, the GPUs each model's replicas hold now (and which: to set NVML's
    utilisation of those GPUs beside the attributed one), and each replica's busy GPU seconds so far (busy
    time x GPUs per replica)."""

    def __init__(self, config: NodeConfig, replicas: Sequence[Replica], busy_seconds: BusySeconds) -> None:
        self.config = config
        self.replicas = replicas
        self.busy_seconds = busy_seconds

    def collect(self) -> Iterator[Metric]:
        price = GaugeMetricFamily("worker_gpu_hour_usd", "Configured cost of one GPU-hour, in USD",
                                  labels=["model"])
        provisioned = GaugeMetricFamily("worker_gpus_provisioned",
                                        "GPUs held by the model's replicas now (started and not stopped)",
                                        labels=["model"])
        busy = CounterMetricFamily("worker_replica_busy_gpu_seconds",
                                   "GPU seconds the replica was busy (at least one request in flight) x its GPUs",
                                   labels=["model", "replica"])
        devices = GaugeMetricFamily("worker_replica_gpu_info", "1 for each GPU (index, as worker_gpu_* label it) a "
                                    "replica holds now", labels=["model", "replica", "gpu"])
        held = {model.id: 0 for model in self.config.models}
        gpus_of = {model.id: model.gpus_per_replica for model in self.config.models}
        busy_by_replica = self.busy_seconds()
        for replica in self.replicas:
            gpus = gpus_of.get(replica.model_id, 1)
            if replica.state in HOLDING_GPUS:
                held[replica.model_id] = held.get(replica.model_id, 0) + gpus
                for index in replica.spec.gpu_ids:
                    devices.add_metric([replica.model_id, replica.replica_id, str(index)], 1.0)
            busy.add_metric([replica.model_id, replica.replica_id],
                            busy_by_replica.get(replica.replica_id, 0.0) * gpus)
        for model in self.config.models:
            price.add_metric([model.id], float(gpu_hour_usd(self.config, model)))
            provisioned.add_metric([model.id], held[model.id])
        yield price
        yield provisioned
        yield busy
        yield devices
