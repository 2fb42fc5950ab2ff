"""Engine metrics re-exported per replica, and the node's own capacity metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.engines.mock.metrics import EngineMetrics
from worker.metrics import EngineMetricsCollector


def _engine_page(running: int, generated: int) -> str:
    metrics = EngineMetrics("acme/m", block_size=16, num_gpu_blocks=100)
    metrics.set_load(running=running, waiting=0, kv_usage=0.1)
    metrics.generated(generated)
    return metrics.render().decode() + "process_cpu_seconds_total 3.0\n"


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_replicas_engine_metrics_get_model_and_replica_labels() -> None:
    pages = [("acme/m", "acme-m-0", _engine_page(3, 10)), ("acme/m", "acme-m-1", _engine_page(1, 20))]
    registry = CollectorRegistry()
    registry.register(EngineMetricsCollector(lambda: pages))
    samples = _samples(registry)
    base = (("engine", "0"), ("model", "acme/m"), ("model_name", "acme/m"))
    assert samples[("vllm:num_requests_running", tuple(sorted((*base, ("replica", "acme-m-0")))))] == 3
    assert samples[("vllm:num_requests_running", tuple(sorted((*base, ("replica", "acme-m-1")))))] == 1
    assert samples[("vllm:generation_tokens_total", tuple(sorted((*base, ("replica", "acme-m-1")))))] == 20
    assert any(name == "vllm:time_to_first_token_seconds_bucket" for name, _ in samples)
    assert not any(name.startswith("process_") for name, _ in samples)  # the engine's own process stays out


def test_unreadable_page_is_skipped() -> None:
    pages = [("acme/m", "acme-m-0", "vllm:num_requests_running{ broken"), ("acme/m", "acme-m-1", _engine_page(2, 1))]
    registry = CollectorRegistry()
    registry.register(EngineMetricsCollector(lambda: pages))
    replicas = {dict(labels).get("replica") for _, labels in _samples(registry)}
    assert replicas == {"acme-m-1"}
