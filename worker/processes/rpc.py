"""Framed RPC between the worker process and a child of its: typed messages over a Unix socket.

A frame is a fixed header (the body's size, a call id, what the frame is) and one message encoded with
msgspec's MessagePack codec, decoded on arrival into the message types the channel was opened with (a
union of tagged structs), so that both sides share one definition of every field. Either side may call
the other (a call, answered by a reply with the same id) or tell it something (no answer). Frames are
delivered in the order they were sent.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

logger = logging.getLogger(__name__)

Message = TypeVar("Message")
_HEADER = struct.Struct("!IIB")  # body size, call id (0 for a tell), FrameKind


class FrameKind(enum.IntEnum):
    tell = 0
    call = 1
    reply = 2


class ChannelClosed(ConnectionError):
    pass


# Called with each message the other side tells or calls; for a call, with the id to `reply` to (else 0).
MessageHandler = Callable[[Message, int], None]


class Channel(Generic[Message]):
    """One end of a connection; used from the event loop that opened it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message_type: Any,
                 on_message: MessageHandler[Message]) -> None:
        self._reader = reader
        self._writer = writer
        self._on_message = on_message
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(message_type)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self.closed = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def over(cls, sock: socket.socket, message_type: Any,
                   on_message: MessageHandler[Message]) -> Channel[Message]:
        """A channel over a connected socket; `message_type` is what the other side sends (a union)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        channel = cls(reader, writer, message_type, on_message)
        channel._reading = asyncio.ensure_future(channel._read())
        return channel

    def _send(self, kind: FrameKind, call_id: int, message: Any) -> None:
        if self.closed.is_set():
            raise ChannelClosed("the other process is gone")
        # A buffer of its own per frame: a transport may keep a view of it until it is sent.
        buffer = bytearray(_HEADER.size)
        self._encoder.encode_into(message, buffer, _HEADER.size)
        _HEADER.pack_into(buffer, 0, len(buffer) - _HEADER.size, call_id, kind)
        self._writer.write(buffer)

    def tell(self, message: Any) -> None:
        self._send(FrameKind.tell, 0, message)

    def reply(self, call_id: int, answer: Any) -> None:
        """Answer the call `call_id`; nothing when the other side is gone already."""
        if not self.closed.is_set():
            self._send(FrameKind.reply, call_id, answer)

    async def call(self, message: Any) -> Message:
        """Send `message` and wait for its answer; ChannelClosed when the other side goes first."""
        call_id = next(self._ids)
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = answer
        try:
            self._send(FrameKind.call, call_id, message)
            return await answer
        finally:
            self._waiting.pop(call_id, None)

    async def _read(self) -> None:
        reader, decode = self._reader, self._decoder.decode
        try:
            while True:
                size, call_id, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                message = decode(await reader.readexactly(size))
                if kind == FrameKind.reply:
                    waiting = self._waiting.pop(call_id, None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(message)
                    continue
                try:
                    self._on_message(message, call_id)
                except Exception:  # one bad message must not end the channel
                    logger.exception("cannot handle a message from the other process")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except msgspec.DecodeError:
            logger.exception("the other process sent a message this one cannot read; closing the channel")
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
