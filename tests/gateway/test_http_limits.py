"""Hostile clients against a real `worker serve --engine mock`: huge headers, slow heads and bodies, many
idle connections, more connections than the cap. The worker's memory stays bounded and it keeps answering."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from tests.support.worker_process import (
    WorkerProcess,
    eventually,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
)

MODEL = "acme/limited"
# Generous deadlines for the cuts themselves; nothing here asserts how fast they come.
DEADLINE_S = 30.0
MIB = 1024 * 1024


def _start(tmp_path: Path, http: dict[str, object]) -> WorkerProcess:
    config = {"worker": {"id": "limits-worker", "http": http}, "models": [fast_mock_model(MODEL)]}
    return ready_or_stopped(start_worker(tmp_path, config))


@pytest.fixture(scope="module")
def hostile_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = _start(tmp_path_factory.mktemp("hostile"),
                  {"header_timeout_s": 2, "body_timeout_s": 2, "max_connections": 32})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def default_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    _allow_open_files(4096)  # this process holds the idle connections' client ends
    proc = _start(tmp_path_factory.mktemp("default"), {})
    yield proc
    proc.stop()


def _allow_open_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _rss_mib(worker: WorkerProcess) -> float:
    return psutil.Process(worker.process.pid).memory_info().rss / MIB


async def _status_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), DEADLINE_S)


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server ends the connection (EOF or reset); False if it is still open at the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


async def _capacity_in_flight(worker: WorkerProcess) -> int:
    async with httpx.AsyncClient(base_url=worker.base_url) as client:
        document = (await client.get("/capacity", timeout=10)).json()
    return sum(replica["in_flight"] for model in document["models"] for replica in model["replicas"])


async def _health_live(worker: WorkerProcess) -> int:
    async with httpx.AsyncClient(base_url=worker.base_url) as client:
        return (await client.get("/health/live", timeout=DEADLINE_S)).status_code


async def _send_huge_header(port: int, size: int) -> bytes:
    """Send a request whose one header is `size` bytes; the server's status line (or b"" if none came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /v1/models HTTP/1.1\r\nhost: worker\r\nx-huge: ")
            for _ in range(size // 65536):
                writer.write(b"h" * 65536)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        return await _status_line(reader)
    finally:
        sending.cancel()  # the server stops reading after the refusal: no need to send the rest
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()


async def test_16_mib_headers_get_431_and_leave_the_workers_memory_alone(
        hostile_worker: WorkerProcess) -> None:
    before = _rss_mib(hostile_worker)
    answers = await asyncio.gather(*(_send_huge_header(hostile_worker.port, 16 * MIB) for _ in range(4)))
    after = _rss_mib(hostile_worker)
    print(f"worker RSS before 4 x 16 MiB headers {before:.1f} MiB, after {after:.1f} MiB")
    assert all(answer.startswith(b"HTTP/1.1 431 ") for answer in answers), answers
    assert after - before < 8, (before, after)  # before the limit: +84 MiB, and every request answered 200
    assert await _health_live(hostile_worker) == 200


async def test_a_head_sent_one_byte_a_second_is_cut_after_the_header_timeout(
        hostile_worker: WorkerProcess) -> None:
    trickling: list[int] = []

    async def slowloris() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile_worker.port)
        started = time.monotonic()
        answer = asyncio.create_task(_status_line(reader))
        with contextlib.suppress(ConnectionError):
            for sent, byte in enumerate(b"GET /v1/models HTTP/1.1\r\nhost: worker\r\nx-slow: " + b"s" * 60):
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                if sent == 1:
                    trickling.append(1)  # connected, and its head has begun to trickle
                await asyncio.sleep(1.0)  # the trickle itself: a byte a second
        status = await answer
        closed = await _closed_by_server(reader)
        writer.close()
        return (status if closed else b"still open"), time.monotonic() - started

    clients = [asyncio.create_task(slowloris()) for _ in range(50)]

    async def all_trickling() -> bool:
        return len(trickling) == len(clients)

    assert await eventually(all_trickling, timeout_s=DEADLINE_S)
    assert await _health_live(hostile_worker) == 200  # answers while 50 heads trickle in
    results = await asyncio.gather(*clients)
    assert all(status.startswith(b"HTTP/1.1 408 ") for status, _ in results), results
    assert max(elapsed for _, elapsed in results) < DEADLINE_S


async def test_a_trickled_inference_body_is_cut_and_holds_nothing(hostile_worker: WorkerProcess) -> None:
    messages = [{"role": "user", "content": "hi " * 50}]
    body = orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": 4})
    status = await _trickle_body(hostile_worker.port, b"/v1/chat/completions", body)
    assert status.startswith(b"HTTP/1.1 408 "), status
    assert await _capacity_in_flight(hostile_worker) == 0
    async with httpx.AsyncClient(base_url=hostile_worker.base_url) as client:
        served = await client.post("/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"}, timeout=DEADLINE_S)
    assert served.status_code == 200
    assert await _capacity_in_flight(hostile_worker) == 0


async def test_connections_over_the_cap_are_refused_with_429_and_health_still_answers(
        hostile_worker: WorkerProcess) -> None:
    kept: list[asyncio.StreamWriter] = []
    refusal: bytes = b""
    try:
        for _ in range(64):  # the cap is 32: the refusal comes well before
            reader, writer = await asyncio.open_connection("127.0.0.1", hostile_worker.port)
            kept.append(writer)
            writer.write(b"GET /v1/models HTTP/1.1\r\nhost: worker\r\n\r\n")
            status = await _status_line(reader)
            if not status.startswith(b"HTTP/1.1 200 "):
                refusal = status + await asyncio.wait_for(reader.read(65536), DEADLINE_S)
                assert await _closed_by_server(reader)
                break
            head_and_body = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
            length = int(next(line.split(b":")[1] for line in head_and_body.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)  # then kept alive, idle
        assert refusal.startswith(b"HTTP/1.1 429 "), refusal
        assert len(kept) <= 33
        head, _, payload = refusal.partition(b"\r\n\r\n")
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        assert orjson.loads(payload)["error"]["code"] == "too_many_connections"
        assert await _health_live(hostile_worker) == 200  # above the cap too
    finally:
        for writer in kept:
            writer.close()
    async with httpx.AsyncClient(base_url=hostile_worker.base_url) as client:
        deadline = time.monotonic() + DEADLINE_S
        while (await client.get("/v1/models", timeout=DEADLINE_S)).status_code != 200:
            assert time.monotonic() < deadline, "closed connections did not make room"
            await asyncio.sleep(0.2)


async def test_a_thousand_idle_connections_cost_little_and_are_closed(default_worker: WorkerProcess) -> None:
    before = _rss_mib(default_worker)
    connections = [await asyncio.open_connection("127.0.0.1", default_worker.port) for _ in range(1000)]
    try:
        # A connection opened after them is answered once the worker accepted every earlier one (its listen
        # queue is first in, first out): then all 1,000 are in its memory.
        assert await _health_live(default_worker) == 200
        during = _rss_mib(default_worker)
        print(f"worker RSS idle {before:.1f} MiB, with 1,000 idle connections {during:.1f} MiB "
              f"({(during - before) * 1024 / 1000:.1f} KiB per connection)")
        assert during - before < 32, (before, during)
        # None of them sent a request: each is closed at the header timeout (10 s by default).
        closed = await asyncio.gather(*(_closed_by_server(reader) for reader, _ in connections))
        assert all(closed)
    finally:
        for _, writer in connections:
            writer.close()
    assert await _health_live(default_worker) == 200


async def _trickle_body(port: int, path: bytes, body: bytes) -> bytes:
    """Send a request head, then its body a byte every half second; the server's status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nhost: worker\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:20])
    answer = asyncio.create_task(_status_line(reader))
    with contextlib.suppress(ConnectionError):
        for byte in body[20:]:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)
    status = await answer
    closed = await _closed_by_server(reader)
    writer.close()
    return status if closed else b"still open"


async def test_relay_processes_apply_the_same_limits(tmp_path: Path) -> None:
    config = {"worker": {"id": "relayed-limits", "gateway_processes": 2,
                         "http": {"header_timeout_s": 2, "body_timeout_s": 2}},
              "models": [fast_mock_model(MODEL)]}
    proc = start_worker(tmp_path, config)
    ready_or_stopped(proc, lambda: len(proc.gateway_processes()) == 2)
    try:
        processes = [psutil.Process(proc.process.pid), *proc.gateway_processes()]
        before = sum(process.memory_info().rss for process in processes) / MIB
        answers = await asyncio.gather(*(_send_huge_header(proc.port, 16 * MIB) for _ in range(4)))
        after = sum(process.memory_info().rss for process in processes) / MIB
        assert all(answer.startswith(b"HTTP/1.1 431 ") for answer in answers), answers
        assert after - before < 12, (before, after)  # three processes

        messages = [{"role": "user", "content": "hi"}]
        body = orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": 4})
        assert (await _trickle_body(proc.port, b"/v1/chat/completions", body)).startswith(b"HTTP/1.1 408 ")
        assert await _capacity_in_flight(proc) == 0
        assert await _health_live(proc) == 200
    finally:
        proc.stop()
