"""How a replica's watcher scrapes its engine: the admission samples alone, the whole page only on demand."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import CapacityMonitor
from worker.capacity.stats import ADMISSION_SAMPLES
from worker.capacity.watchdog import ENGINE_INFO_SAMPLES, FILTERED_METRICS_PATH, ReplicaWatch
from worker.config import NodeConfig
from worker.engines.base import ReplicaSpec
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.replica import Replica, ReplicaState

Handler = Callable[[httpx.Request], httpx.Response]


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


class Exporter:
    """An engine's metrics endpoints; `filtered` says whether /metrics/ honours `name[]` as vLLM's does."""

    def __init__(self, *, filtered: bool) -> None:
        self.filtered = filtered
        self.metrics = EngineMetrics("acme/m", block_size=16, num_gpu_blocks=100)
        self.metrics.set_load(running=3, waiting=2, kv_usage=0.25)
        self.metrics.generated(40)
        self.requests: list[httpx.Request] = []
        self.fail_next = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail_next:
            self.fail_next = False
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/metrics":
            return httpx.Response(200, content=self.metrics.render())
        if request.url.path == FILTERED_METRICS_PATH and self.filtered:
            return httpx.Response(200, content=self.metrics.render(request.url.params.get_list("name[]")))
        return httpx.Response(404)

    @property
    def paths(self) -> list[str]:
        return [request.url.path for request in self.requests]


def _config() -> NodeConfig:
    return NodeConfig(worker={"id": "w"}, models=[in_memory_model()])  # type: ignore[arg-type]


def _replica(config: NodeConfig, exporter: Exporter) -> Replica:
    replica = Replica(IdleEngine(ReplicaSpec(model=config.models[0], index=0, host="127.0.0.1", port=1)))
    replica.client = httpx.AsyncClient(transport=httpx.MockTransport(exporter), base_url="http://engine")
    replica.set_state(ReplicaState.ready)
    return replica


def _watch(exporter: Exporter) -> ReplicaWatch:
    config = _config()
    monitor = CapacityMonitor(config, {"acme/m": [_replica(config, exporter)]}, on_hung=_never_hung)
    [watch] = monitor.watches["acme/m"]
    return watch


async def test_admission_scrapes_ask_only_for_the_samples_admission_reads() -> None:
    exporter = Exporter(filtered=True)
    watch = _watch(exporter)

    await watch.check_once()
    await watch.check_once()

    assert exporter.paths == [FILTERED_METRICS_PATH, FILTERED_METRICS_PATH]
    assert exporter.requests[0].url.params.get_list("name[]") == [*ADMISSION_SAMPLES, *ENGINE_INFO_SAMPLES]
    stats = watch.load.stats
    assert stats is not None
    assert (stats.running, stats.waiting, stats.kv_cache_usage, stats.generation_tokens_total) == (3, 2, 0.25, 40)
    assert watch.load.engine_page is None  # nothing to re-export was fetched
    # The info metrics came with it, for the node-level view.
    assert watch.load.scraped_page is not None and "vllm:cache_config_info{" in watch.load.scraped_page
    assert "vllm:time_to_first_token_seconds" not in watch.load.scraped_page


async def test_an_exporter_without_the_filter_is_scraped_whole_from_then_on() -> None:
    exporter = Exporter(filtered=False)
    watch = _watch(exporter)

    await watch.check_once()
    await watch.check_once()

    assert exporter.paths == [FILTERED_METRICS_PATH, "/metrics", "/metrics"]
    assert watch.load.stats is not None and watch.load.stats.running == 3


async def test_a_failed_scrape_does_not_give_up_the_filter() -> None:
    exporter = Exporter(filtered=True)
    watch = _watch(exporter)
    exporter.fail_next = True

    await watch.check_once()
    await watch.check_once()

    assert exporter.paths == [FILTERED_METRICS_PATH, FILTERED_METRICS_PATH]
    assert watch.load.stats is not None


@pytest.mark.parametrize("state", [ReplicaState.ready, ReplicaState.restarting])
async def test_engine_pages_are_fetched_whole_for_re_export_from_serving_replicas(state: ReplicaState) -> None:
    exporter = Exporter(filtered=True)
    config = _config()
    replica = _replica(config, exporter)
    monitor = CapacityMonitor(config, {"acme/m": [replica]}, on_hung=_never_hung)
    replica.set_state(state)

    await monitor.fetch_engine_pages()

    pages = list(monitor.engine_scrapes())
    if state is ReplicaState.ready:
        assert exporter.paths == ["/metrics"]
        assert pages == [("acme/m", replica.replica_id, exporter.metrics.render().decode())]
    else:
        assert exporter.paths == [] and pages == []
