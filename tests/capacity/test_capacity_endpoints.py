"""/capacity, /health/*, engine metrics in the node's /metrics, load headers and SSE keep-alives."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.capacity.capacity_support import assert_finished_normally, chat_body, paced_model, worker_config
from tests.support.worker_process import WorkerProcess, fast_mock_model, start_worker, wait_until

FAST = "acme/fast"
SLOW_START = "acme/slow-first-token"
EMBED = "acme/embed"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> WorkerProcess:
    config = worker_config(
        fast_mock_model(FAST, replicas=2),
        # Each engine step takes 1.2 s: the first token comes long after the keep-alive interval.
        paced_model(SLOW_START, step_ms=1200.0),
        fast_mock_model(EMBED, task="embed"),
        sse_keepalive_interval_s=0.2,
    )
    proc = start_worker(tmp_path_factory.mktemp("endpoints"), config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_capacity_document_shape(worker: WorkerProcess) -> None:
    httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(FAST, 5), timeout=30)

    def settled() -> bool:  # engine stats are scraped periodically: wait for one taken after the request
        replicas = [r for m in httpx.get(f"{worker.base_url}/capacity").json()["models"] for r in m["replicas"]]
        return all(r["running"] == 0 and r["waiting"] == 0 for r in replicas)

    assert wait_until(settled, timeout_s=10)
    document = httpx.get(f"{worker.base_url}/capacity").json()
    assert document["worker_id"] == "capacity-worker"
    assert document["ready"] is True and document["draining"] is False
    assert document["gpu_monitoring"] in ("available", "nvml_unavailable")
    models = {m["id"]: m for m in document["models"]}
    assert set(models) == {FAST, SLOW_START, EMBED}
    fast = models[FAST]
    assert fast["state"] == "ready" and fast["admission_enabled"] is True and fast["max_model_len"] == 512
    assert [r["replica"] for r in fast["replicas"]] == ["acme-fast-0", "acme-fast-1"]
    for replica in fast["replicas"]:
        assert replica["state"] == "ready"
        assert replica["engine"] == "mock"
        assert replica["max_num_seqs"] == 16 and replica["max_in_flight"] == 16
        assert replica["running"] == 0 and replica["waiting"] == 0 and replica["in_flight"] == 0
        assert 0 <= replica["kv_cache_usage"] <= 1
        assert replica["output_tokens_per_s"] >= 0 and replica["requests_finished_per_s"] >= 0
        assert replica["estimated_queue_wait_s"] == 0
        assert replica["stats_age_s"] >= 0
        assert replica["restarts"] == 0 and replica["hang_restarts"] == 0
        assert replica["gpus"] == []  # no GPU on this node


def test_health_endpoints(worker: WorkerProcess) -> None:
    live = httpx.get(f"{worker.base_url}/health/live")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    ready = httpx.get(f"{worker.base_url}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == {FAST: ["ready", "ready"], SLOW_START: ["ready"], EMBED: ["ready"]}


def test_engine_metrics_are_re_exported_with_model_and_replica(worker: WorkerProcess) -> None:
    httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(FAST, 5), timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{worker.base_url}/metrics").text)}
    running = families["vllm:num_requests_running"]
    assert {(s.labels["model"], s.labels["replica"]) for s in running.samples} == {
        (FAST, "acme-fast-0"), (FAST, "acme-fast-1"), (SLOW_START, "acme-slow-first-token-0"), (EMBED, "acme-embed-0")}
    generated = sum(s.value for s in families["vllm:generation_tokens"].samples
                    if s.name.endswith("_total") and s.labels["model"] == FAST)
    assert generated >= 5
    assert families["worker_ready"].samples[0].value == 1
    assert families["worker_draining"].samples[0].value == 0
    assert "worker_admission_rejections" in families
    own = [name for name in families if not name.startswith("vllm:")]
    assert own and not [name for name in own if "vllm" in name]


def test_every_inference_answer_carries_the_replicas_load(worker: WorkerProcess) -> None:
    response = httpx.post(f"{worker.base_url}/v1/embeddings", json={"model": EMBED, "input": "hello"}, timeout=30)
    assert response.status_code == 200
    for name in ("x-worker-replica", "x-worker-in-flight", "x-worker-queue-depth", "x-worker-running",
                 "x-worker-kv-cache-usage"):
        assert response.headers[name]
    assert 0 <= float(response.headers["x-worker-kv-cache-usage"]) <= 1


def test_slow_first_token_gets_keep_alive_comments(worker: WorkerProcess) -> None:
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions",
                      json=chat_body(SLOW_START, 2, stream=True), timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert ": keep-alive" in lines[:first_data]
    assert ": keep-alive" not in lines[first_data:]  # only while waiting for the first token
    assert_finished_normally(lines)


def test_fast_stream_has_no_keep_alive(worker: WorkerProcess) -> None:
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions",
                      json=chat_body(FAST, 3, stream=True), timeout=30) as response:
        lines = list(response.iter_lines())
    assert ": keep-alive" not in lines
    assert_finished_normally(lines)


def test_prompt_that_cannot_fit_is_refused_before_the_engine(worker: WorkerProcess) -> None:
    body = {"model": FAST, "messages": [{"role": "user", "content": "word " * 1200}], "max_tokens": 1}
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "x-worker-replica" not in response.headers
