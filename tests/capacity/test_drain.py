"""Graceful drain: on SIGTERM, or on the operator's word through /admin/drain."""

from __future__ import annotations

import signal
import threading

import httpx
import psutil
import pytest

from tests.capacity.capacity_support import (
    assert_ended_with_error_chunk,
    assert_finished_normally,
    chat_body,
    metric_value,
    paced_model,
    wait_until,
    worker_config,
)
from tests.support.worker_process import WorkerProcess, start_worker

MODEL = "acme/drainable"
ADMIN_TOKEN = "admin-secret-for-tests-0123456789abcdef"


class BackgroundStream:
    """A streaming request read on a thread, so the test can act while it runs."""

    def __init__(self, worker: WorkerProcess, max_tokens: int) -> None:
        self.lines: list[str] = []
        self.status: int | None = None
        self.first_token = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(worker.base_url, max_tokens), daemon=True)
        self._thread.start()

    def _run(self, base_url: str, max_tokens: int) -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                              json=chat_body(MODEL, max_tokens, stream=True), timeout=60) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.lines.append(line)
                    if line.startswith("data: "):
                        self.first_token.set()
        finally:
            self.first_token.set()

    def join(self) -> list[str]:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        return self.lines


def _all_gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def _refused_while_draining(worker: WorkerProcess) -> None:
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(MODEL, 3), timeout=10)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "draining" in response.json()["error"]["message"]


def test_sigterm_lets_an_admitted_stream_finish_and_exits_zero(tmp_path) -> None:
    worker = start_worker(tmp_path, worker_config(paced_model(MODEL, step_ms=20.0), drain_grace_s=30))
    try:
        worker.wait_ready()
        children = worker.descendants()
        stream = BackgroundStream(worker, max_tokens=250)  # about 5 s of tokens
        assert stream.first_token.wait(30) and stream.status == 200
        worker.process.send_signal(signal.SIGTERM)

        assert wait_until(lambda: httpx.get(f"{worker.base_url}/health/ready").status_code == 503)
        # The socket stays open: new work is refused plainly, liveness still answers.
        _refused_while_draining(worker)
        assert httpx.get(f"{worker.base_url}/health/live").status_code == 200
        assert metric_value(worker, "worker_draining") == 1

        assert_finished_normally(stream.join())
        assert worker.process.wait(timeout=60) == 0
        assert wait_until(lambda: _all_gone(children))
    finally:
        worker.stop()


def test_stream_outlasting_the_grace_period_ends_with_error_chunk(tmp_path) -> None:
    worker = start_worker(tmp_path, worker_config(paced_model(MODEL, step_ms=20.0), drain_grace_s=0.5))
    try:
        worker.wait_ready()
        stream = BackgroundStream(worker, max_tokens=4000)  # far longer than the grace period
        assert stream.first_token.wait(30)
        worker.process.send_signal(signal.SIGTERM)
        chunk = assert_ended_with_error_chunk(stream.join())
        assert "shutting down" in chunk["error"]["message"]
        assert worker.process.wait(timeout=60) == 0
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def admin_worker(tmp_path_factory: pytest.TempPathFactory) -> WorkerProcess:
    proc = start_worker(tmp_path_factory.mktemp("admin"), worker_config(paced_model(MODEL, step_ms=1.0)),
                        env={"WORKER_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}"])
def test_admin_drain_needs_the_admin_token(admin_worker: WorkerProcess, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.post(f"{admin_worker.base_url}/admin/drain", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{admin_worker.base_url}/health/ready").status_code == 200


def test_admin_drain_and_undrain(admin_worker: WorkerProcess) -> None:
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    base = admin_worker.base_url
    drained = httpx.post(f"{base}/admin/drain", headers=auth)
    assert drained.status_code == 200 and drained.json()["draining"] is True
    try:
        ready = httpx.get(f"{base}/health/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        _refused_while_draining(admin_worker)
        assert httpx.get(f"{base}/capacity").json()["models"][0]["replicas"][0]["state"] == "draining"
        assert metric_value(admin_worker, "worker_admission_rejections_total", model=MODEL, reason="draining") == 1
    finally:
        undrained = httpx.post(f"{base}/admin/undrain", headers=auth)
    assert undrained.status_code == 200 and undrained.json()["draining"] is False
    assert httpx.get(f"{base}/health/ready").status_code == 200
    answer = httpx.post(f"{base}/v1/chat/completions", json=chat_body(MODEL, 3), timeout=30)
    assert answer.status_code == 200
