"""WORKER_METRICS_TOKEN guards /metrics, /metrics/node and /capacity (health stays open), with the worker
process serving the port itself and with relay processes passing these requests on to it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import WorkerProcess, fast_mock_model, ready_or_stopped, start_worker, wait_until

METRICS_TOKEN = "metrics-token-0123456789abcdef0123456789"
CHAT = "acme/chat"
GUARDED = ("/metrics", "/metrics/node", "/capacity")
OPEN = ("/health", "/health/live", "/health/ready")


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "relay-processes"])
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    processes = request.param
    config = {"worker": {"id": "guarded-worker", "gateway_processes": processes},
              "models": [fast_mock_model(CHAT, replicas=2)]}
    proc = start_worker(tmp_path_factory.mktemp("guarded"), config, env={"WORKER_METRICS_TOKEN": METRICS_TOKEN})
    ready_or_stopped(proc, lambda: len(proc.gateway_processes()) == (processes if processes > 1 else 0))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("path", GUARDED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {METRICS_TOKEN}", "Bearer"])
def test_monitoring_pages_refuse_a_missing_or_wrong_token(worker: WorkerProcess, path: str,
                                                          authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.get(worker.base_url + path, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_metrics_token" and error["type"] == "authentication_error"
    assert METRICS_TOKEN not in response.text


@pytest.mark.parametrize("path", GUARDED)
def test_monitoring_pages_answer_the_token(worker: WorkerProcess, path: str) -> None:
    response = httpx.get(worker.base_url + path, headers={"authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", OPEN)
def test_health_stays_open(worker: WorkerProcess, path: str) -> None:
    assert httpx.get(worker.base_url + path, timeout=10).status_code == 200


def test_node_view_answers_once_for_the_model(worker: WorkerProcess) -> None:
    headers = {"authorization": f"Bearer {METRICS_TOKEN}"}

    def families() -> dict[str, list]:
        page = httpx.get(f"{worker.base_url}/metrics/node", headers=headers, timeout=10).text
        return {family.name: family.samples for family in text_string_to_metric_families(page)}

    # Each replica's first admission scrape after it became ready.
    assert wait_until(lambda: "vllm:cache_config_info" in families(), timeout_s=10)
    found = families()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info"):
        assert [sample.labels["model_name"] for sample in found[name]] == [CHAT], name
    [cache] = found["vllm:cache_config_info"]
    assert cache.labels["block_size"] == "16"
    # Two replicas: the node holds both engines' blocks (the mock engine's count is the same for each).
    per_replica = int(cache.labels["num_gpu_blocks"]) / 2
    assert per_replica == int(per_replica) and per_replica > 0
    assert found["vllm:lora_requests_info"] == []  # the mock engine serves no LoRA adapters
    # The per-replica re-exports stay on /metrics, labelled by replica, not model_name.
    metrics = httpx.get(f"{worker.base_url}/metrics", headers=headers, timeout=10).text
    [waiting] = [f for f in text_string_to_metric_families(metrics) if f.name == "vllm:num_requests_waiting"]
    assert sorted(sample.labels["replica"] for sample in waiting.samples) == ["acme-chat-0", "acme-chat-1"]
