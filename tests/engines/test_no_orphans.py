"""No engine outlives its supervision, on a real worker with the mock engine (the fast twin of
tests/vllm/test_vllm_orphans.py): SIGKILL of the guard, of the engine and of the worker each leaves no
process of the old launch, and the replica serves again on its port; a port held by something else is
reported in /capacity and taken once it is free; leftovers of a dead worker are ended at start-up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.engine_markers import MARKER_ENV, listeners, marked_processes, process_group
from tests.support.worker_process import WorkerProcess, fast_mock_model, free_port, start_worker, wait_until

MODEL = "acme/supervised"
REPLICA = "acme-supervised-0"


def _config(engine_port: int, worker_id: str = "supervised-worker") -> dict:
    return {"worker": {"id": worker_id, "restart_backoff_initial_s": 0.2, "restart_backoff_max_s": 1.0,
                       "engine_port_start": engine_port, "engine_stop_timeout_s": 2.0},
            "models": [fast_mock_model(MODEL)]}


@pytest.fixture(scope="module")
def engine_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, engine_port: int) -> Iterator[WorkerProcess]:
    proc = start_worker(tmp_path_factory.mktemp("supervised"), _config(engine_port))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _chat(worker: WorkerProcess) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=30)


def _launch_of(worker: WorkerProcess) -> str:
    """The marker's launch id of the replica's running engine (the process listening on its port)."""
    (port,) = worker.engine_ports()
    (marked,) = [m for m in marked_processes() if m.pid in listeners(port)]
    assert marked.marker["owner_pid"] == worker.process.pid
    return str(marked.marker["launch"])


def _guard(worker: WorkerProcess) -> psutil.Process:
    (guard,) = [p for p in worker.descendants() if "worker.engines.guard" in " ".join(p.cmdline())]
    return guard


def _capacity_replica(worker: WorkerProcess) -> dict:
    document = httpx.get(f"{worker.base_url}/capacity", timeout=10).json()
    (replica,) = document["models"][0]["replicas"]
    return replica


def _serves_again_without_orphans(worker: WorkerProcess, old_launch: str, old_listener: int, port: int) -> None:
    assert wait_until(lambda: listeners(port) not in (set(), {old_listener}), timeout_s=60), worker.log()[-3000:]
    worker.wait_ready(timeout_s=60)
    assert [m for m in marked_processes() if m.marker["launch"] == old_launch] == []
    (listener,) = listeners(port)
    assert listener != old_listener
    assert _chat(worker).status_code == 200


def test_engine_processes_carry_the_marker_and_the_guard_group(worker: WorkerProcess, engine_port: int) -> None:
    guard = _guard(worker)
    (listener,) = listeners(engine_port)
    assert listener in {p.pid for p in process_group(guard.pid)}
    launch = _launch_of(worker)
    marked = {m.pid for m in marked_processes() if m.marker["launch"] == launch}
    assert {guard.pid, listener} <= marked


def test_sigkill_of_the_guard_leaves_no_orphan(worker: WorkerProcess, engine_port: int) -> None:
    launch = _launch_of(worker)
    (old_listener,) = listeners(engine_port)
    _guard(worker).send_signal(signal.SIGKILL)
    _serves_again_without_orphans(worker, launch, old_listener, engine_port)
    assert "Address already in use" not in worker.log()


def test_sigkill_of_the_engine_leaves_no_orphan(worker: WorkerProcess, engine_port: int) -> None:
    launch = _launch_of(worker)
    (old_listener,) = listeners(engine_port)
    os.kill(old_listener, signal.SIGKILL)
    _serves_again_without_orphans(worker, launch, old_listener, engine_port)


def test_sigkill_of_the_worker_leaves_no_orphan(worker: WorkerProcess, engine_port: int,
                                                tmp_path: Path) -> None:
    # Runs last in this module: it kills the module's worker.
    old_pid = worker.process.pid
    (old_listener,) = listeners(engine_port)
    worker.stop(signal.SIGKILL)
    successor = start_worker(tmp_path, _config(engine_port))
    try:
        _serves_again_without_orphans(successor, "none", old_listener, engine_port)
        assert [m for m in marked_processes() if m.marker["owner_pid"] == old_pid] == []
    finally:
        successor.stop()


def _leftover_of_a_dead_worker(replica: str) -> subprocess.Popen[bytes]:
    """A process that looks like an engine a killed worker left behind, deaf to SIGTERM."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    marker = {"worker_id": "supervised-worker", "replica": replica, "owner_pid": gone.pid,
              "owner_started": started, "launch": "0ff"}
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
              "time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, MARKER_ENV: json.dumps(marker)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    return proc


def test_start_up_ends_leftovers_and_reports_a_port_held_by_another_process(tmp_path: Path) -> None:
    port = free_port()
    leftover = _leftover_of_a_dead_worker(REPLICA)
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    worker = start_worker(tmp_path, _config(port, worker_id="port-test-worker"))
    try:
        assert wait_until(lambda: "ended engine processes left behind by a previous worker" in worker.log(),
                          timeout_s=60), worker.log()[-3000:]
        assert leftover.wait(timeout=10) == -signal.SIGKILL  # it ignored SIGTERM

        reported: list[dict] = []

        def port_in_use_reported() -> bool:
            # The snapshot that said port_in_use is the one checked: the retry with backoff may already have
            # put the replica back to loading by a second read.
            try:
                replica = _capacity_replica(worker)
            except httpx.HTTPError:
                return False
            reported[:] = [replica]
            return replica["lifecycle"] == "port_in_use"

        assert wait_until(port_in_use_reported, timeout_s=60), worker.log()[-3000:]
        replica = reported[0]
        assert replica["state"] == "unhealthy"
        assert replica["port_holder"] == {"port": port, "pid": os.getpid(), "name": psutil.Process().name()}
        assert httpx.get(f"{worker.base_url}/health/ready").status_code == 503
        assert "replica port is in use by another process" in worker.log()
        assert not worker.engine_ports()  # nothing was started beside the holder

        holder.close()
        worker.wait_ready(timeout_s=60)
        assert _capacity_replica(worker)["port_holder"] is None
        assert _chat(worker).status_code == 200
    finally:
        holder.close()
        worker.stop()
        if leftover.poll() is None:
            leftover.kill()
        leftover.wait()
