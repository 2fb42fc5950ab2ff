"""Engines that run as child processes of the worker (vLLM, the mock), each under an engine guard."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys

from worker.engines.base import Engine, EngineExited, PortInUse, ReplicaSpec
from worker.engines.loading import parse_load_progress
from worker.engines.process_tree import (
    ENGINE_MARKER_ENV,
    KEEP_ENVIRON_READABLE,
    EngineMarker,
    end_processes,
    launch_processes,
    port_holder,
)

logger = logging.getLogger(__name__)

OUTPUT_TAIL_LINES = 60
GUARD_EXIT_POLL_S = 0.1


async def _exit_status(process: asyncio.subprocess.Process) -> int:
    """The guard's exit status once it exited. Not `process.wait()`: that also waits for the output pipe
    to close, which engine processes that outlived a killed guard hold open."""
    while process.returncode is None:  # noqa: ASYNC110  (nothing to await: asyncio sets returncode)
        await asyncio.sleep(GUARD_EXIT_POLL_S)
    return process.returncode


class ProcessEngine(Engine):
    """An engine started from a command line; its output is logged and its tail kept for crash reports.

    Each launch runs in a process group of its own (the guard's) and carries a marker in its environment;
    `stop()` ends both, so nothing of a launch outlives it, whichever of its processes died first.
    """

    def __init__(self, spec: ReplicaSpec, command: list[str], env: dict[str, str], stop_grace_s: float,
                 worker_id: str, guard_python: str = sys.executable) -> None:
        super().__init__(spec)
        self.command = command
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.worker_id = worker_id
        self.guard_python = guard_python
        self._process: asyncio.subprocess.Process | None = None
        # The running (or not yet swept) launch: its marker; its process group is the guard's pid.
        self._launch: EngineMarker | None = None
        self._output_tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def launch(self) -> EngineMarker | None:
        return self._launch

    @property
    def output_tail(self) -> str:
        return "\n".join(self._output_tail)

    async def start(self) -> None:
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError(f"replica {self.spec.replica_id} is already running")
        await self._sweep_launch()  # a launch the caller did not stop is ended before the next one
        await self._claim_port()
        self._output_tail.clear()
        self.load_progress = None
        self._launch = EngineMarker.for_launch(self.worker_id, self.spec.replica_id)
        guard = [self.guard_python, "-m", "worker.engines.guard", "--parent", str(os.getpid()),
                 "--grace", str(self.stop_grace_s), "--"]
        self._process = await asyncio.create_subprocess_exec(
            *guard, *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **KEEP_ENVIRON_READABLE, **self.env, ENGINE_MARKER_ENV: self._launch.encode()},
            start_new_session=True,  # own process group: the engine tree inherits it
        )
        self._pump = asyncio.create_task(self._pump_output(self._process), name=f"output-{self.spec.replica_id}")
        logger.info("engine started", extra={"replica": self.spec.replica_id, "pid": self._process.pid,
                                             "engine": self.kind, "gpus": list(self.spec.gpu_ids),
                                             "launch": self._launch.launch})

    async def _claim_port(self) -> None:
        """Make sure the port is free: end our own leftover holding it, refuse to start beside anything else."""
        host, port = self.spec.host, self.spec.port
        holder = await asyncio.to_thread(port_holder, host, port)
        if holder is None:
            return
        marker = holder.marker
        ours = marker is not None and (not marker.owner_alive()
                                       or (marker.owned_by_this_process() and marker.replica == self.spec.replica_id))
        if ours and holder.pid is not None:
            assert marker is not None
            pids = await asyncio.to_thread(lambda: end_processes(
                launch_processes(marker.launch, process_group=None), self.stop_grace_s))
            logger.warning("ended a leftover engine that held the replica's port", extra={
                "replica": self.spec.replica_id, "port": port, "pids": pids, "leftover_of": marker.replica,
                "leftover_worker_pid": marker.owner_pid})
            holder = await asyncio.to_thread(port_holder, host, port)
            if holder is None:
                return
        raise PortInUse(port, holder.pid, holder.name)

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line over the stream limit: keep going with the rest
                continue
            if not raw:
                return
            # Progress bars redraw themselves after a carriage return: each redraw is a line of its own.
            for part in raw.decode("utf-8", "replace").split("\r"):
                line = part.rstrip()
                if line:
                    self._take_line(line)

    def _take_line(self, line: str) -> None:
        self._output_tail.append(line)
        logger.info(line, extra={"replica": self.spec.replica_id, "source": "engine"})
        progress = parse_load_progress(line)
        if progress is not None:
            self.load_progress = progress

    async def wait_exit(self) -> EngineExited:
        process = self._process
        if process is None:
            raise RuntimeError("engine not started")
        returncode = await _exit_status(process)
        if self._pump is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, timeout=2)
        return EngineExited(returncode, self.output_tail)

    async def stop(self, timeout_s: float | None = None) -> None:
        process = self._process
        if process is None or (process.returncode is not None and self._launch is None):
            return  # never started, or stopped and swept already
        timeout_s = timeout_s if timeout_s is not None else self.stop_grace_s
        if process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(_exit_status(process), timeout=timeout_s + 10)
            except ProcessLookupError:
                pass
            except TimeoutError:
                logger.warning("engine guard did not stop in time; ending its process group",
                               extra={"replica": self.spec.replica_id})
        # Also when the guard exited on its own: killed guards leave their engine tree behind.
        await self._sweep_launch(timeout_s)
        await _exit_status(process)
        logger.info("engine stopped", extra={"replica": self.spec.replica_id, "returncode": process.returncode})

    async def _sweep_launch(self, grace_s: float | None = None) -> None:
        """End every process of the current launch still alive: its process group and its marked processes."""
        launch, process = self._launch, self._process
        if launch is None or process is None:
            return
        grace = grace_s if grace_s is not None else self.stop_grace_s
        pids = await asyncio.to_thread(
            lambda: end_processes(launch_processes(launch.launch, process_group=process.pid), grace))
        self._launch = None
        # The guard itself is ended here only when it was stuck; anything else outlived its guard.
        outlived = [pid for pid in pids if pid != process.pid]
        if outlived:
            logger.warning("ended engine processes that outlived their guard", extra={
                "replica": self.spec.replica_id, "pids": outlived, "launch": launch.launch})
