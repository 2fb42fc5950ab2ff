"""The worker's side of the billing database process (sqlite_server.py): start it, send work, await answers.

Everything here runs on the event loop, without threads: a request is pickled and written to a Unix socket
(one for writes, one for reads), and a task per socket reads the answers and resolves the futures waiting
for them. Should the process die, every
request waiting on it fails with an error that says so, and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from worker.billing.store.sqlite_server import (
    FRAME_HEADER,
    DatabaseSettings,
    Outcome,
    WriteAnswer,
    WriteJob,
)
from worker.python_child import start_python, wait_or_kill

T = TypeVar("T")
logger = logging.getLogger(__name__)
_EXIT_TIMEOUT_S = 30.0


class DatabaseProcessGone(RuntimeError):
    pass


_ENTRY = "from worker.billing.store.sqlite_server import main; main()"


class DatabaseProcess:
    """Used from the one event loop that started it. Writes and reads go over sockets of their own
    (see sqlite_server.py); request ids are unique across both."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings
        self._process: asyncio.subprocess.Process | None = None
        # "write" and "read" -> the worker's end of that socket; None while no process is running.
        self._channels: dict[str, asyncio.StreamWriter] | None = None
        self._answers: list[asyncio.Task[None]] = []
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._starting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        if self._channels is not None:
            return
        if self._starting is None:  # callers that arrive during a start wait for the same one
            self._starting = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> None:
        pairs = {kind: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for kind in ("write", "read")}
        theirs = [pairs[kind][1].fileno() for kind in ("write", "read")]
        settings = self._settings
        try:
            process = await start_python(
                _ENTRY, *map(str, theirs), str(settings.path), settings.synchronous, str(settings.readers),
                pass_fds=tuple(theirs),
            )
        except BaseException:
            for ours, _ in pairs.values():
                ours.close()
            raise
        finally:
            for _, their_end in pairs.values():
                their_end.close()
        channels = {}
        self._answers = []
        for kind, (ours, _) in pairs.items():
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            channels[kind] = writer
            self._answers.append(asyncio.ensure_future(self._read_answers(reader, channels)))
        self._process, self._channels = process, channels
        logger.info("billing database process started",
                    extra={"pid": process.pid, "path": str(self._settings.path)})

    async def write(self, batch: list[WriteJob]) -> WriteAnswer:
        answer: WriteAnswer | Outcome = await self._request("write", batch)
        if isinstance(answer, Outcome):  # the batch could not be read there: it all fails
            assert answer.error is not None
            raise answer.error
        return answer

    async def read(self, work: Callable[[Any], T]) -> T:
        outcome: Outcome = await self._request("read", work)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result  # type: ignore[no-any-return]

    async def _request(self, kind: str, body: Any) -> Any:
        if self._channels is None:
            await self.start()
            assert self._channels is not None
        request_id = next(self._ids)
        payload = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        self._channels[kind].write(FRAME_HEADER.pack(len(payload), request_id) + payload)
        try:
            return await answer
        finally:
            self._waiting.pop(request_id, None)

    async def _read_answers(
        self, reader: asyncio.StreamReader, channels: dict[str, asyncio.StreamWriter]
    ) -> None:
        try:
            while True:
                size, request_id = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                answer = pickle.loads(await reader.readexactly(size))
                waiting = self._waiting.pop(request_id, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            # Either socket closing means the process is ending: whatever waits on it hears so.
            if self._channels is channels:
                self._channels = None
                if not self._closed:
                    logger.error("billing database process exited",
                                 extra={"pid": self.pid, "waiting": len(self._waiting)})
            gone = DatabaseProcessGone("the billing database process ended before answering")
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(gone)
            self._waiting.clear()
            for writer in channels.values():
                writer.close()

    async def close(self) -> None:
        """Let the process finish what it was sent, then wait for it to exit."""
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        channels, process = self._channels, self._process
        if channels is not None:
            for writer in channels.values():
                writer.write_eof()  # the process answers what it has, then exits
        await asyncio.gather(*self._answers)
        if process is not None:
            await wait_or_kill(process, _EXIT_TIMEOUT_S, "billing database process")
