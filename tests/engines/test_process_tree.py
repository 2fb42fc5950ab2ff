"""No engine process outlives its launch: a scripted engine tree shaped like vLLM's, under the real guard.

The script stands in for vLLM's API server: it listens on the replica's port and starts an "engine core"
in its process group and a "worker" that leaves it with setsid; both ignore SIGTERM, the worst case for
the worker's sweep (SIGTERM, grace, SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import psutil
import pytest

from tests.support.worker_process import eventually, free_port
from worker.config import ModelConfig
from worker.engines.base import PortInUse, ReplicaSpec
from worker.engines.process import ProcessEngine
from worker.engines.process_tree import ENGINE_MARKER_ENV, EngineMarker, leftover_processes

STUBBORN_CHILD = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
)
# argv[1]: port. Prints the pids of its two children once they run and it listens.
ENGINE_SCRIPT = f"""
import os, socket, subprocess, sys, time
child = {STUBBORN_CHILD!r}
core = subprocess.Popen([sys.executable, "-c", child])
detached = subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
print("children", core.pid, detached.pid, flush=True)
while core.poll() is None:  # like vLLM's API server, it ends when its engine core dies
    time.sleep(0.1)
sys.exit(3)
"""
GRACE_S = 1.0


def _model() -> ModelConfig:
    return ModelConfig.model_validate({
        "id": "tree", "engine": "mock", "source": "mock://tree", "engine_args": {"max_model_len": 256},
        "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "2"}})


def _engine(port: int) -> ProcessEngine:
    spec = ReplicaSpec(model=_model(), index=0, host="127.0.0.1", port=port)
    return ProcessEngine(spec, [sys.executable, "-c", ENGINE_SCRIPT, str(port)], env={}, stop_grace_s=GRACE_S,
                         worker_id="tree-test")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _with_launch(launch: str) -> list[psutil.Process]:
    """Live processes whose environment carries the marker of `launch` (read here, not by the code tested)."""
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get(ENGINE_MARKER_ENV, "")
        except psutil.Error:
            continue
        if launch in value and _alive(proc):
            found.append(proc)
    return found


async def _children_pids(engine: ProcessEngine) -> tuple[int, int]:
    async def printed() -> bool:
        return "children" in engine.output_tail

    assert await eventually(printed, timeout_s=30), engine.output_tail
    line = next(line for line in engine.output_tail.splitlines() if line.startswith("children"))
    _, core, detached = line.split()
    return int(core), int(detached)


@pytest.fixture
async def engine() -> AsyncIterator[ProcessEngine]:
    engine = _engine(free_port())
    try:
        yield engine
    finally:
        await engine.stop()


async def test_every_process_of_a_launch_carries_its_marker(engine: ProcessEngine) -> None:
    await engine.start()
    core, detached = await _children_pids(engine)
    assert engine.launch is not None
    marked = {proc.pid for proc in _with_launch(engine.launch.launch)}
    assert {engine.pid, core, detached} <= marked
    assert os.getpgid(core) == engine.pid  # the engine core stays in the guard's group ...
    assert os.getpgid(detached) != engine.pid  # ... the detached one is found only by its marker


async def test_a_killed_guard_leaves_no_process_behind(engine: ProcessEngine) -> None:
    await engine.start()
    core, detached = await _children_pids(engine)
    assert engine.pid is not None and engine.launch is not None
    launch = engine.launch.launch
    (server,) = psutil.Process(engine.pid).children()
    tree = [psutil.Process(core), psutil.Process(detached)]

    os.kill(engine.pid, signal.SIGKILL)
    await engine.wait_exit()

    async def server_gone() -> bool:
        return not _alive(server)

    # The server learns of its guard's death from the kernel (parent-death signal) ...
    assert await eventually(server_gone, timeout_s=10)
    # ... and what it started, re-parented away and deaf to SIGTERM, is ended by the sweep.
    assert all(_alive(proc) for proc in tree)
    await engine.stop()
    assert _with_launch(launch) == []
    assert not any(_alive(proc) for proc in tree)


async def test_a_killed_engine_core_ends_the_launch(engine: ProcessEngine) -> None:
    await engine.start()
    core, _ = await _children_pids(engine)
    assert engine.launch is not None
    launch = engine.launch.launch

    os.kill(core, signal.SIGKILL)
    exited = await asyncio.wait_for(engine.wait_exit(), timeout=30)
    assert exited.returncode == 3
    await engine.stop()
    assert _with_launch(launch) == []


async def test_a_restart_sweeps_the_previous_launch_and_takes_the_port_again(engine: ProcessEngine) -> None:
    await engine.start()
    await _children_pids(engine)
    assert engine.pid is not None and engine.launch is not None
    first = engine.launch.launch
    os.kill(engine.pid, signal.SIGKILL)
    await engine.wait_exit()

    await engine.start()  # without stop(): start() itself ends what the last launch left
    assert _with_launch(first) == []
    await _children_pids(engine)
    assert engine.launch is not None and engine.launch.launch != first


async def test_a_port_held_by_another_process_is_refused_with_its_pid(engine: ProcessEngine) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", engine.spec.port))
        holder.listen()
        with pytest.raises(PortInUse) as refused:
            await engine.start()
    assert refused.value.holder_pid == os.getpid()
    assert refused.value.port == engine.spec.port
    assert engine.pid is None  # nothing was started beside it


def _dead_owner_marker(replica: str) -> EngineMarker:
    """The marker a worker that no longer runs put on its engines."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    return EngineMarker(worker_id="tree-test", replica=replica, owner_pid=gone.pid, owner_started=started,
                        launch="feedface")


def _leftover(marker: EngineMarker, port: int | None) -> subprocess.Popen[bytes]:
    listen = f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); " if port else ""
    script = listen + ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "print('up', flush=True); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env={**os.environ, ENGINE_MARKER_ENV: marker.encode()}, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    return proc


async def test_a_leftover_of_a_dead_worker_on_the_port_is_ended(engine: ProcessEngine) -> None:
    leftover = _leftover(_dead_owner_marker(engine.spec.replica_id), engine.spec.port)
    try:
        await engine.start()
        assert leftover.wait(timeout=10) == -signal.SIGKILL  # it ignored SIGTERM
        await _children_pids(engine)
    finally:
        leftover.kill()
        leftover.wait()


async def test_leftovers_are_those_whose_worker_is_gone(engine: ProcessEngine) -> None:
    await engine.start()
    await _children_pids(engine)
    leftover = _leftover(_dead_owner_marker("tree-9"), port=None)
    try:
        found = {item.process.pid: item.marker for item in leftover_processes()}
        assert leftover.pid in found and found[leftover.pid].replica == "tree-9"
        assert engine.pid not in found  # this process owns the running launch
    finally:
        leftover.kill()
        leftover.wait()
