"""Messages between the worker process and one relay process: length-prefixed JSON over a Unix socket.

Either side may call the other (a message with a `call` id, answered by one with the same `reply` id)
or just tell it something (no id). Messages are delivered in the order they were sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Any

import orjson

logger = logging.getLogger(__name__)
Message = dict[str, Any]
_HEADER = struct.Struct("!I")


class ChannelClosed(ConnectionError):
    pass


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_message: Callable[[Message], None]) -> None:
        self._reader = reader
        self._writer = writer
        self._on_message = on_message
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self.closed = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def over(cls, sock: Any, on_message: Callable[[Message], None]) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        channel = cls(reader, writer, on_message)
        channel._reading = asyncio.ensure_future(channel._read())
        return channel

    def tell(self, message: Message) -> None:
        if self.closed.is_set():
            raise ChannelClosed("the other process is gone")
        body = orjson.dumps(message)
        self._writer.write(_HEADER.pack(len(body)) + body)

    def reply(self, call: Message, answer: Message) -> None:
        if not self.closed.is_set():
            self.tell({**answer, "reply": call["call"]})

    async def call(self, message: Message) -> Message:
        """Send `message` and wait for its answer; ChannelClosed when the other side goes first."""
        call_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = answer
        try:
            self.tell({**message, "call": call_id})
            return await answer
        finally:
            self._waiting.pop(call_id, None)

    async def _read(self) -> None:
        reader = self._reader
        try:
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                message = orjson.loads(await reader.readexactly(size))
                reply_to = message.get("reply")
                if reply_to is None:
                    try:
                        self._on_message(message)
                    except Exception:  # one bad message must not end the channel
                        logger.exception("cannot handle a message from the other gateway process")
                    continue
                waiting = self._waiting.pop(reply_to, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            gone = ChannelClosed("the other process closed the channel")
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(gone)
            self._waiting.clear()
            self._writer.close()

    async def aclose(self) -> None:
        if not self.closed.is_set():
            self._writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
