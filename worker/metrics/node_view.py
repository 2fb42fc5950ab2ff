"""`GET /metrics/node`: the node as one model server, in the model-server protocol's vLLM names.

The Gateway API Inference Extension's endpoint picker (and llm-d, which uses it) reads
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:lora_requests_info` and `vllm:cache_config_info` from each endpoint; `/metrics` has them once per
replica (labels `model`, `replica`), which a picker would read as several servers or not at all. Here
each model has one answer, labelled `model_name`:

- running: the sum over the model's replicas; waiting: the sum of their engines' waiting queues and the
  worker's own queue of the model (requests admitted and not yet bound to a replica);
- KV-cache usage: the mean over replicas, i.e. the share of the node's KV-cache blocks in use (replicas of
  a model share one configuration). The gateway sends each request to its least-loaded replica, so the
  room left is the node's total; the maximum would call a node full while a sibling replica is empty;
- cache config: the block size, and the node's GPU blocks summed over replicas;
- LoRA: the adapters running or waiting on any replica, and the smallest `max_lora` (a request may land
  on any replica), with the newest update time as the value, as vLLM reports it.

The numbers come from the worker's own admission scrapes (every `stats_interval_s`), so a picker polling
every 50 ms adds no load to the engines. Replicas that are starting, restarting or external report
nothing; a model with no reporting replica is left out, which a picker treats as not serving it. The
page is built in a registry of its own per scrape: names containing "vllm" never enter a registry
vLLM might empty.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from worker.capacity.watchdog import ReplicaWatch

logger = logging.getLogger(__name__)

CACHE_CONFIG_INFO = "vllm:cache_config_info"
LORA_REQUESTS_INFO = "vllm:lora_requests_info"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: str
    num_gpu_blocks: int


@dataclass(frozen=True, slots=True)
class LoraState:
    running: frozenset[str]
    waiting: frozenset[str]
    max_lora: int
    updated_at: float  # the engine's timestamp, the gauge's value


@dataclass(frozen=True, slots=True)
class ReplicaReading:
    """What one serving replica last reported."""

    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    cache_config: CacheConfig | None = None
    lora: LoraState | None = None


def readings_from_watches(
        watches_by_model: Mapping[str, Sequence[ReplicaWatch]]) -> dict[str, list[ReplicaReading]]:
    """The reading of every replica whose engine has reported since it (re)started, by model id."""
    readings: dict[str, list[ReplicaReading]] = {}
    for model_id, watches in watches_by_model.items():
        for watch in watches:
            stats = watch.load.stats if watch.has_metrics else None
            if stats is None:
                continue
            cache_config, lora = engine_info(watch.load.scraped_page or "", watch.replica.replica_id)
            readings.setdefault(model_id, []).append(ReplicaReading(
                running=stats.running, waiting=stats.waiting, kv_cache_usage=stats.kv_cache_usage,
                cache_config=cache_config, lora=lora))
    return readings


def engine_info(page: str, replica_id: str = "") -> tuple[CacheConfig | None, LoraState | None]:
    """The cache config and newest LoRA state in an engine's metrics text (None for what it lacks)."""
    if CACHE_CONFIG_INFO not in page and LORA_REQUESTS_INFO not in page:
        return None, None
    cache_config: CacheConfig | None = None
    lora: LoraState | None = None
    try:
        families = list(text_string_to_metric_families(page))
    except ValueError:
        logger.warning("engine metrics unparsable", extra={"replica": replica_id})
        return None, None
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if sample.name == CACHE_CONFIG_INFO and "num_gpu_blocks" in labels:
                blocks = _integer(labels["num_gpu_blocks"])
                # Data-parallel engines report one sample each.
                earlier = cache_config.num_gpu_blocks if cache_config is not None else 0
                cache_config = CacheConfig(labels.get("block_size", ""), earlier + blocks)
            elif sample.name == LORA_REQUESTS_INFO and (lora is None or sample.value > lora.updated_at):
                # vLLM keeps every label set it ever reported; the newest value is the current state.
                lora = LoraState(_adapters(labels.get("running_lora_adapters", "")),
                                 _adapters(labels.get("waiting_lora_adapters", "")),
                                 _integer(labels.get("max_lora", "0")), sample.value)
    return cache_config, lora


class NodeModelServerCollector:
    def __init__(self, readings: Mapping[str, Sequence[ReplicaReading]],
                 queued: Mapping[str, int] | None = None) -> None:
        self.readings = readings
        self.queued = queued or {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        model = ["model_name"]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting on the node for the model (its engines' and the worker's "
            "queues)", labels=model)
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests in the batches of the model's replicas", labels=model)
        kv_usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "Share of the model's KV-cache blocks in use (mean over replicas); 1 means 100 percent",
            labels=model)
        cache_info = GaugeMetricFamily(
            "vllm:cache_config_info", "KV-cache configuration of the model (GPU blocks of all replicas)",
            labels=[*model, "block_size", "num_gpu_blocks"])
        lora_info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters running or waiting on the model's replicas; value: when updated",
            labels=[*model, "running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        for model_id, readings in sorted(self.readings.items()):
            if not readings:
                continue
            waiting.add_metric([model_id], sum(r.waiting for r in readings) + self.queued.get(model_id, 0))
            running.add_metric([model_id], sum(r.running for r in readings))
            kv_usage.add_metric([model_id], sum(r.kv_cache_usage for r in readings) / len(readings))
            configs = [r.cache_config for r in readings if r.cache_config is not None]
            if configs:
                blocks = sum(config.num_gpu_blocks for config in configs)
                cache_info.add_metric([model_id, configs[0].block_size, str(blocks)], 1.0)
            loras = [r.lora for r in readings if r.lora is not None]
            if loras:
                running_adapters = _joined(name for lora in loras for name in lora.running)
                waiting_adapters = _joined(name for lora in loras for name in lora.waiting)
                max_lora = str(min(lora.max_lora for lora in loras))
                lora_info.add_metric([model_id, running_adapters, waiting_adapters, max_lora],
                                     max(lora.updated_at for lora in loras))
        yield from (waiting, running, kv_usage, cache_info, lora_info)


def render_node_page(readings: Mapping[str, Sequence[ReplicaReading]],
                     queued: Mapping[str, int] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeModelServerCollector(readings, queued))
    return generate_latest(registry)


def _adapters(text: str) -> frozenset[str]:
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def _joined(names: Iterable[str]) -> str:
    return ",".join(sorted(set(names)))


def _integer(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0
