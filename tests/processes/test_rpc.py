"""The framed RPC between the worker and its child processes, over a real socket pair."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest

from worker.processes.rpc import Channel, ChannelClosed


class Ask(msgspec.Struct, tag="ask"):
    text: str
    headers: list[tuple[bytes, bytes]]


class Note(msgspec.Struct, tag="note"):
    seq: int


class Answer(msgspec.Struct, tag="answer"):
    text: str


Inbound = Ask | Note


async def test_calls_are_answered_by_id_and_tells_arrive_in_order_with_their_types() -> None:
    ours, theirs = socket.socketpair()
    notes: list[int] = []
    server: Channel[Inbound] | None = None

    def on_message(message: Inbound, call_id: int) -> None:
        assert server is not None
        if isinstance(message, Note):
            notes.append(message.seq)
        else:
            server.reply(call_id, Answer(text=message.text.upper() + message.headers[0][1].decode()))

    server = await Channel.over(theirs, Inbound, on_message)
    client: Channel[Answer] = await Channel.over(ours, Answer, lambda message, call_id: None)
    for seq in range(5):
        client.tell(Note(seq=seq))
    answers = await asyncio.gather(*(client.call(Ask(text=f"q{i}", headers=[(b"x", str(i).encode())]))
                                     for i in range(3)))
    assert answers == [Answer(text="Q00"), Answer(text="Q11"), Answer(text="Q22")]
    assert notes == [0, 1, 2, 3, 4]
    await client.aclose()
    await server.aclose()


async def test_a_call_waiting_when_the_other_side_closes_fails_with_channel_closed() -> None:
    ours, theirs = socket.socketpair()
    server: Channel[Inbound] = await Channel.over(theirs, Inbound, lambda message, call_id: None)  # never answers
    client: Channel[Answer] = await Channel.over(ours, Answer, lambda message, call_id: None)
    waiting = asyncio.ensure_future(client.call(Ask(text="q", headers=[])))
    await asyncio.sleep(0)
    await server.aclose()
    with pytest.raises(ChannelClosed):
        await waiting
    await client.closed.wait()
    with pytest.raises(ChannelClosed):
        client.tell(Note(seq=1))
    await client.aclose()


async def test_a_message_of_an_unknown_type_closes_the_channel_rather_than_guessing() -> None:
    ours, theirs = socket.socketpair()
    received: list[object] = []
    server: Channel[Note] = await Channel.over(theirs, Note, lambda message, call_id: received.append(message))
    client: Channel[Answer] = await Channel.over(ours, Answer, lambda message, call_id: None)
    client.tell(Answer(text="not a note"))
    await asyncio.wait_for(server.closed.wait(), 5)
    assert received == []
    await client.aclose()
    await server.aclose()
