"""The mock engine's KV-cache event publisher: vLLM's ZmqEventPublisher on the same wire.

A PUB socket sends `(topic, seq, msgpack batch)` per engine step that changed the cache; the last
`buffer_steps` batches are kept for the optional ROUTER replay socket (worker/engines/kv_events.py).
Sending never blocks the engine: ZMQ drops batches for a subscriber past the high-water mark, which it
notices as a gap in the sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import zmq
import zmq.asyncio

from worker.engines.kv_events import REPLAY_END_SEQ, KvEvent, KvEventBatch, encode_batch, seq_bytes

logger = logging.getLogger(__name__)

BUFFER_STEPS = 10_000  # vLLM's default replay buffer
HWM = 100_000  # vLLM's default high-water mark


class KvEventPublisher:
    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 buffer_steps: int = BUFFER_STEPS) -> None:
        self._context = zmq.asyncio.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(HWM)
        self._pub.bind(endpoint)
        self._replay = None
        if replay_endpoint is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._replay_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts answering replay requests (needs the running event loop)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-events-replay")

    def publish(self, events: list[KvEvent]) -> None:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        payload = encode_batch(KvEventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            # NOBLOCK on a PUB socket completes at once (or drops): nothing to await.
            self._pub.send_multipart((self._topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)

    async def aclose(self) -> None:
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._context.destroy(linger=0)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                logger.warning("kv events replay request not understood")
                continue
            client, _, start_frame = frames
            start = int.from_bytes(start_frame, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart((client, b"", self._topic, seq_bytes(seq), payload))
            await self._replay.send_multipart((client, b"", b"", seq_bytes(REPLAY_END_SEQ), b""))
