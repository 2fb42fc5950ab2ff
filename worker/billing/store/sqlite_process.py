"""The worker's side of the billing database process (sqlite_server.py): start it, send work, await answers.

Everything here runs on the event loop, without threads: a request is pickled and written to a Unix socket,
and one task reads the answers and resolves the futures waiting for them. Should the process die, every
request waiting on it fails with an error that says so, and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from worker.billing.store.sqlite_server import (
    FRAME_HEADER,
    DatabaseSettings,
    Outcome,
    WriteAnswer,
    WriteJob,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)
_EXIT_TIMEOUT_S = 30.0


class DatabaseProcessGone(RuntimeError):
    pass


# A fresh interpreter rather than a fork of the worker (which would copy its threads' locks mid-use) or
# multiprocessing's start methods (which re-run the parent's main script in the child).
_ENTRY = "from worker.billing.store.sqlite_server import main; main()"


class DatabaseProcess:
    """Used from the one event loop that started it."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: asyncio.Task[None] | None = None
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
        if self._writer is not None:
            return
        if self._starting is None:  # callers that arrive during a start wait for the same one
            self._starting = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = self._settings
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _ENTRY,
                str(theirs.fileno()), str(settings.path), settings.synchronous, str(settings.readers),
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._process, self._writer = process, writer
        self._answers = asyncio.ensure_future(self._read_answers(reader, writer))
        logger.info("billing database process started",
                    extra={"pid": process.pid, "path": str(self._settings.path)})

    async def write(self, batch: list[WriteJob]) -> WriteAnswer:
        answer: WriteAnswer = await self._request("write", batch)
        return answer

    async def read(self, work: Callable[[Any], T]) -> T:
        outcome: Outcome = await self._request("read", work)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result  # type: ignore[no-any-return]

    async def _request(self, kind: str, body: Any) -> Any:
        if self._writer is None:
            await self.start()
            assert self._writer is not None
        request_id = next(self._ids)
        payload = pickle.dumps((kind, request_id, body), protocol=pickle.HIGHEST_PROTOCOL)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        self._writer.write(FRAME_HEADER.pack(len(payload)) + payload)
        try:
            return await answer
        finally:
            self._waiting.pop(request_id, None)

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER.size)
                request_id, answer = pickle.loads(await reader.readexactly(FRAME_HEADER.unpack(header)[0]))
                waiting = self._waiting.pop(request_id, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            gone = DatabaseProcessGone("the billing database process ended before answering")
            if not self._closed:
                logger.error("billing database process exited",
                             extra={"pid": self.pid, "waiting": len(self._waiting)})
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(gone)
            self._waiting.clear()
            if self._writer is writer:
                self._writer = None
            writer.close()

    async def close(self) -> None:
        """Let the process finish what it was sent, then wait for it to exit."""
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        writer, process, answers = self._writer, self._process, self._answers
        if writer is not None:
            writer.write_eof()  # the process answers what it has, then exits
        if answers is not None:
            await answers
        if process is not None:
            try:
                await asyncio.wait_for(process.wait(), _EXIT_TIMEOUT_S)
            except TimeoutError:
                logger.error("billing database process did not exit; killing it", extra={"pid": process.pid})
                process.kill()
                await process.wait()
