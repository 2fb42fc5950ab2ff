"""The worker's side of the billing database process (sqlite_server.py): a child kept by the `ChildSupervisor`
like the others (docs/architecture.md). Calls made while it restarts wait for it (up to `_RESTART_WAIT_S`), so
the writes the group commit holds go to the new process.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from worker.billing.store.sqlite_server import Answer, Batch, DatabaseSettings, Query
from worker.config import WorkerSection
from worker.processes.python_child import start_python, wait_or_kill
from worker.processes.rpc import Channel, ChannelClosed
from worker.processes.supervisor import ChildSupervisor, Ended, RestartPolicy, RunEnd

logger = logging.getLogger(__name__)
_ENTRY = "from worker.billing.store.sqlite_server import main; main()"
_EXIT_TIMEOUT_S = 30.0
_RESTART_WAIT_S = 10.0
# The engines' and relays' policy at the worker section's defaults (the store is opened without models.yaml).
_POLICY = RestartPolicy(
    initial_s=WorkerSection.model_fields["restart_backoff_initial_s"].default,
    max_s=WorkerSection.model_fields["restart_backoff_max_s"].default,
)


class DatabaseProcessGone(RuntimeError):
    pass


class DatabaseProcess:
    """Used from the one event loop that started it."""

    def __init__(self, settings: DatabaseSettings, policy: RestartPolicy = _POLICY) -> None:
        self._settings = settings
        self._supervisor = ChildSupervisor("billing-database", self._run_once, policy)
        self._process: asyncio.subprocess.Process | None = None
        self._channel: Channel[Answer] | None = None
        self._up = asyncio.Event()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._up.is_set() else None

    async def start(self) -> None:
        """Start the process (raising what kept it from starting), then keep it running."""
        await self._spawn()
        self._supervisor.start()

    async def call(self, request: Batch | Query) -> Answer:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), _RESTART_WAIT_S)
            except TimeoutError:
                raise DatabaseProcessGone("the billing database process is not running") from None
        assert self._channel is not None
        try:
            return await self._channel.call(request)
        except ChannelClosed:
            raise DatabaseProcessGone("the billing database process ended before answering") from None

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = self._settings
        try:
            self._process = await start_python(
                _ENTRY, str(theirs.fileno()), str(settings.path), settings.synchronous, str(settings.readers),
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = await Channel.over(ours, Answer, lambda message, call_id: None)
        self._up.set()
        logger.info("billing database process started", extra={"pid": self._process.pid, "path": str(settings.path)})

    async def _run_once(self) -> Ended:
        if not self._up.is_set():  # the first run is the one `start` made
            try:
                await self._spawn()
            except Exception as error:  # noqa: BLE001  whatever kept it from starting: logged, retried
                logger.error("billing database process cannot start", extra={"error": repr(error)})
                return Ended(RunEnd.refused)
        assert self._channel is not None and self._process is not None
        await self._channel.closed.wait()
        self._up.clear()
        logger.error("billing database process exited", extra={"pid": self._process.pid})
        await self._process.wait()
        return Ended(RunEnd.exited)

    async def close(self) -> None:
        """Let the process finish what it was sent, then wait for it to exit."""
        self._closed = True
        await self._supervisor.stop()
        if self._channel is not None:
            await self._channel.aclose()
        if self._process is not None:
            await wait_or_kill(self._process, _EXIT_TIMEOUT_S, "billing database process")
