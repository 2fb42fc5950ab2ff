"""Engines that run as child processes of the worker (vLLM, the mock), each under an engine guard."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import sys

from worker.engines.base import Engine, EngineExited, ReplicaSpec
from worker.engines.loading import parse_load_progress

logger = logging.getLogger(__name__)

OUTPUT_TAIL_LINES = 60


class ProcessEngine(Engine):
    """An engine started from a command line; its output is logged and its tail kept for crash reports."""

    def __init__(self, spec: ReplicaSpec, command: list[str], env: dict[str, str], stop_grace_s: float,
                 guard_python: str = sys.executable) -> None:
        super().__init__(spec)
        self.command = command
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.guard_python = guard_python
        self._process: asyncio.subprocess.Process | None = None
        self._output_tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def output_tail(self) -> str:
        return "\n".join(self._output_tail)

    async def start(self) -> None:
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError(f"replica {self.spec.replica_id} is already running")
        self._output_tail.clear()
        self.load_progress = None
        guard = [self.guard_python, "-m", "worker.engines.guard", "--parent", str(os.getpid()),
                 "--grace", str(self.stop_grace_s), "--"]
        self._process = await asyncio.create_subprocess_exec(
            *guard, *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # own process group: one killpg reaches the whole engine tree
        )
        self._pump = asyncio.create_task(self._pump_output(self._process), name=f"output-{self.spec.replica_id}")
        logger.info("engine started", extra={"replica": self.spec.replica_id, "pid": self._process.pid,
                                             "engine": self.kind, "gpus": list(self.spec.gpu_ids)})

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
        returncode = await process.wait()
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, timeout=2)
            except (TimeoutError, asyncio.CancelledError):
                pass
        return EngineExited(returncode, self.output_tail)

    async def stop(self, timeout_s: float | None = None) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        timeout_s = timeout_s if timeout_s is not None else self.stop_grace_s
        try:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=timeout_s + 10)
        except ProcessLookupError:
            pass
        except TimeoutError:
            logger.warning("engine did not stop in time; killing its process group",
                           extra={"replica": self.spec.replica_id})
        # The guard normally leaves nothing behind; this catches a guard that was itself stuck.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await process.wait()
        logger.info("engine stopped", extra={"replica": self.spec.replica_id, "returncode": process.returncode})
