"""`/metrics/node`: one model-server answer per model, built from the replicas' admission scrapes."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import CapacityMonitor
from worker.config import NodeConfig
from worker.engines.base import ReplicaSpec
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.replica import Replica, ReplicaState
from worker.metrics.node_view import (
    CacheConfig,
    LoraState,
    ReplicaReading,
    engine_info,
    readings_from_watches,
    render_node_page,
)

MODEL = "acme/m"
PROTOCOL_NAMES = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                  "vllm:cache_config_info", "vllm:lora_requests_info"}

# What vLLM 0.32 reports with LoRA on: every label set it ever set stays, the value is when it was set.
LORA_PAGE = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="poem"} 1.8e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="1200"} 1.0
"""


def samples(page: bytes) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(page.decode())}


def only(found: list[Sample], model: str = MODEL) -> Sample:
    [sample] = [s for s in found if s.labels["model_name"] == model]
    return sample


def test_one_answer_per_model_sums_queues_and_averages_the_kv_cache() -> None:
    page = render_node_page({
        MODEL: [
            ReplicaReading(running=3, waiting=2, kv_cache_usage=0.9, cache_config=CacheConfig("16", 1000),
                           lora=LoraState(frozenset({"sql"}), frozenset(), max_lora=4, updated_at=100.0)),
            ReplicaReading(running=1, waiting=0, kv_cache_usage=0.1, cache_config=CacheConfig("16", 1000),
                           lora=LoraState(frozenset({"chat"}), frozenset({"poem"}), max_lora=2, updated_at=200.0)),
        ],
        "acme/other": [ReplicaReading(running=0, waiting=5, kv_cache_usage=0.25)],
        "acme/starting": [],  # no replica has reported: a picker must not see it as an idle server
    })
    found = samples(page)

    assert set(found) == PROTOCOL_NAMES
    assert only(found["vllm:num_requests_waiting"]).value == 2
    assert only(found["vllm:num_requests_running"]).value == 4
    assert only(found["vllm:kv_cache_usage_perc"]).value == 0.5  # the mean, not the fuller replica's 0.9
    cache = only(found["vllm:cache_config_info"])
    assert (cache.labels["block_size"], cache.labels["num_gpu_blocks"], cache.value) == ("16", "2000", 1.0)
    lora = only(found["vllm:lora_requests_info"])
    assert lora.labels["running_lora_adapters"] == "chat,sql"
    assert lora.labels["waiting_lora_adapters"] == "poem"
    assert lora.labels["max_lora"] == "2" and lora.value == 200.0
    assert only(found["vllm:num_requests_waiting"], "acme/other").value == 5
    # Without info metrics from its engines, a model has no info samples, never made-up ones.
    assert not [s for s in found["vllm:cache_config_info"] if s.labels["model_name"] == "acme/other"]
    assert not [s for name in PROTOCOL_NAMES for s in found[name] if s.labels["model_name"] == "acme/starting"]


def test_the_workers_own_queue_counts_as_waiting() -> None:
    readings = {MODEL: [ReplicaReading(running=8, waiting=1, kv_cache_usage=0.5)]}
    found = samples(render_node_page(readings, {MODEL: 12}))
    assert only(found["vllm:num_requests_waiting"]).value == 13  # the engine's 1 and the worker's 12


def test_engine_info_takes_the_newest_lora_state_and_every_data_parallel_engines_blocks() -> None:
    cache, lora = engine_info(LORA_PAGE)
    assert cache == CacheConfig("16", 2200)
    assert lora == LoraState(frozenset({"sql", "chat"}), frozenset({"poem"}), max_lora=4, updated_at=1.8e9)
    assert engine_info("vllm:num_requests_running 1\n") == (None, None)
    assert engine_info("vllm:cache_config_info{ broken") == (None, None)


def test_the_mock_engines_cache_config_is_read() -> None:
    cache, lora = engine_info(EngineMetrics(MODEL, block_size=16, num_gpu_blocks=321).render().decode())
    assert cache == CacheConfig("16", 321) and lora is None


def test_the_page_never_touches_the_global_registry() -> None:
    # vLLM empties every collector named "vllm..." from the global registry when an engine starts in-process.
    before = set(REGISTRY._names_to_collectors)
    render_node_page({MODEL: [ReplicaReading(running=1, waiting=1, kv_cache_usage=0.5)]})
    assert set(REGISTRY._names_to_collectors) == before


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


def _replica(config: NodeConfig, index: int, metrics: EngineMetrics, state: ReplicaState) -> Replica:
    def exporter(request: httpx.Request) -> httpx.Response:
        names = request.url.params.get_list("name[]")
        return httpx.Response(200, content=metrics.render(names or None))

    replica = Replica(IdleEngine(ReplicaSpec(model=config.models[0], index=index, host="127.0.0.1", port=1)))
    replica.client = httpx.AsyncClient(transport=httpx.MockTransport(exporter), base_url="http://engine")
    replica.set_state(state)
    return replica


async def test_readings_come_from_the_admission_scrapes_of_serving_replicas() -> None:
    config = NodeConfig(worker={"id": "w"}, models=[in_memory_model()])  # type: ignore[arg-type]
    busy = EngineMetrics(MODEL, block_size=16, num_gpu_blocks=100)
    busy.set_load(running=3, waiting=2, kv_usage=0.75)
    idle = EngineMetrics(MODEL, block_size=16, num_gpu_blocks=100)
    restarting = EngineMetrics(MODEL, block_size=16, num_gpu_blocks=100)
    restarting.set_load(running=9, waiting=9, kv_usage=1.0)
    replicas = [_replica(config, 0, busy, ReplicaState.ready), _replica(config, 1, idle, ReplicaState.ready),
                _replica(config, 2, restarting, ReplicaState.restarting)]
    monitor = CapacityMonitor(config, {MODEL: replicas}, on_hung=_never_hung)
    assert readings_from_watches(monitor.watches) == {}  # nothing scraped yet

    for watch in monitor.watches[MODEL]:
        await watch.check_once()

    readings = readings_from_watches(monitor.watches)
    assert readings == {MODEL: [
        ReplicaReading(running=3, waiting=2, kv_cache_usage=0.75, cache_config=CacheConfig("16", 100)),
        ReplicaReading(running=0, waiting=0, kv_cache_usage=0.0, cache_config=CacheConfig("16", 100)),
    ]}
    found = samples(render_node_page(readings))
    assert only(found["vllm:num_requests_waiting"]).value == 2
    assert only(found["vllm:kv_cache_usage_perc"]).value == 0.375
    assert only(found["vllm:cache_config_info"]).labels["num_gpu_blocks"] == "200"
