"""A hung engine (its /health still 200) is found from its stalled counters or a failed probe, and restarted."""

from __future__ import annotations

import httpx

from tests.capacity.capacity_support import (
    assert_ended_with_error_chunk,
    chat_body,
    engine_port,
    metric_value,
    paced_model,
    set_fault,
    wait_until,
    worker_config,
)
from tests.support.worker_process import WorkerProcess, start_worker

MODEL = "acme/stuck"


def _start(tmp_path, **health: object) -> WorkerProcess:
    config = worker_config(paced_model(MODEL, step_ms=10.0))
    # A replica with work and no token progress for 1.5 s is hung.
    config["worker"]["engine_health"] = {**config["worker"]["engine_health"], "hang_after_s": 1.5, **health}
    proc = start_worker(tmp_path, config)
    proc.wait_ready()
    return proc


def _replica_view(worker: WorkerProcess) -> dict:
    return httpx.get(f"{worker.base_url}/capacity", timeout=10).json()["models"][0]["replicas"][0]


def test_stalled_stream_ends_with_error_chunk_and_the_replica_restarts(tmp_path) -> None:
    worker = _start(tmp_path)
    try:
        port = engine_port(worker, MODEL)
        old_engine = {p.pid for p in worker.engine_descendants()}
        lines: list[str] = []
        with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions",
                          json=chat_body(MODEL, 4000, stream=True), timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 10:  # tokens flow: now the engine stops making progress
                    set_fault(port, mode="hang")  # /health and /metrics still answer
        chunk = assert_ended_with_error_chunk(lines)
        assert "restarting" in chunk["error"]["message"] and "hung" in chunk["error"]["message"]

        worker.wait_ready(timeout_s=60)
        answer = httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(MODEL, 3), timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
        assert not old_engine & {p.pid for p in worker.engine_descendants()}
        assert _replica_view(worker)["hang_restarts"] == 1
        assert metric_value(worker, "worker_replica_hang_restarts_total", replica="acme-stuck-0") == 1
        assert "engine replica hung; restarting it" in worker.log()
    finally:
        assert worker.stop() == 0


def test_idle_engine_that_ignores_a_probe_is_restarted(tmp_path) -> None:
    # Counter-based detection is slow here (30 s), so only the idle probe can catch this hang in time.
    worker = _start(tmp_path, hang_after_s=30.0, probe_interval_s=0.3, probe_timeout_s=1.0)
    try:
        set_fault(engine_port(worker, MODEL), mode="hang")
        assert wait_until(lambda: _replica_view(worker)["hang_restarts"] == 1, timeout_s=30)
        worker.wait_ready(timeout_s=60)
        answer = httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(MODEL, 3), timeout=30)
        assert answer.status_code == 200
        assert "one-token probe got no answer" in worker.log()
    finally:
        assert worker.stop() == 0


def test_engine_that_answers_errors_is_not_taken_for_hung(tmp_path) -> None:
    worker = _start(tmp_path, probe_interval_s=0.2, probe_timeout_s=1.0)
    try:
        set_fault(engine_port(worker, MODEL), mode="fail_requests")
        assert wait_until(lambda: "engine probe answered with an error" in worker.log(), timeout_s=30)
        assert _replica_view(worker)["hang_restarts"] == 0
        assert httpx.get(f"{worker.base_url}/health/ready").status_code == 200
    finally:
        assert worker.stop() == 0
