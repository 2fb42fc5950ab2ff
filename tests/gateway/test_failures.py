"""Engines that crash or break mid-stream, and shutdown that leaves no process behind."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from tests.support.worker_process import WorkerProcess, fast_mock_model, start_worker, wait_until

MODEL = "acme/fragile"


@pytest.fixture
def worker(tmp_path) -> WorkerProcess:
    config = {
        "worker": {"id": "fragile-worker", "restart_backoff_initial_s": 0.5},
        "models": [fast_mock_model(MODEL)],
    }
    proc = start_worker(tmp_path, config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _chat(worker: WorkerProcess, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=30)


def test_crashed_engine_is_reported_shed_and_restarted(worker: WorkerProcess) -> None:
    [port] = worker.engine_ports()
    old_pids = {p.pid for p in worker.engine_descendants()}
    httpx.post(f"http://127.0.0.1:{port}/mock/fault", json={"mode": "crash"})
    assert wait_until(lambda: httpx.get(f"{worker.base_url}/health/ready").status_code == 503)
    response = _chat(worker)
    if response.status_code != 200:  # still restarting: refused fast and honestly, before any byte
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "provider_overloaded"
    worker.wait_ready(timeout_s=60)
    assert _chat(worker).status_code == 200
    new_pids = {p.pid for p in worker.engine_descendants()}
    assert new_pids and not (new_pids & old_pids)
    assert "replica exited; restarting after backoff" in worker.log()


def test_stream_cut_mid_way_ends_with_error_chunk_and_done(worker: WorkerProcess) -> None:
    [port] = worker.engine_ports()
    httpx.post(f"http://127.0.0.1:{port}/mock/fault", json={"mode": "abort_midstream", "after_tokens": 3})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    import orjson

    error_chunk = orjson.loads(events[-2][len("data: "):])
    assert error_chunk["choices"][0]["finish_reason"] == "error"
    assert error_chunk["error"]["code"] == "engine_unavailable"
    assert error_chunk["object"] == "chat.completion.chunk"


def test_engine_error_event_becomes_router_error_chunk(worker: WorkerProcess) -> None:
    [port] = worker.engine_ports()
    httpx.post(f"http://127.0.0.1:{port}/mock/fault", json={"mode": "error_midstream", "after_tokens": 2})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"error"' in events[-2]
    assert '"error":{' in events[-2]


def test_sigterm_stops_every_engine_process(worker: WorkerProcess) -> None:
    children = worker.descendants()
    assert children
    assert worker.stop(signal.SIGTERM) == 0
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children),
                       timeout_s=30)


def test_sigkill_of_worker_leaves_no_orphan(worker: WorkerProcess) -> None:
    children = worker.descendants()
    assert len(children) >= 3  # guard + engine, and the billing database's process
    assert worker.billing_database_processes()
    worker.stop(signal.SIGKILL)

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)

    assert wait_until(all_gone, timeout_s=30)
