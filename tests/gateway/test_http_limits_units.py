"""The HTTP server's limits (worker.gateway.http_limits) on a small app served in this process, with raw
sockets for the clients: head size, head and body deadlines, the connection cap, and what they leave alone."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from worker.config import ConfigError, HttpLimitsConfig, NodeConfig
from worker.config.loader import parse_node_config
from worker.gateway import http_limits
from worker.gateway.http_limits import LINGER_S, LimitedConfig, ensure_open_files

# Generous: the cuts themselves are asserted, not how fast they come.
DEADLINE_S = 15.0


@dataclass
class RecordingApp:
    """Answers 200 with how many body bytes it read; remembers the paths it served and the disconnects."""

    delay_s: float = 0.0
    paths: list[str] = field(default_factory=list)
    disconnects: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await asyncio.sleep(self.delay_s)
        body = orjson.dumps({"body_bytes": size})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def limited_server(app: RecordingApp, **limits: object) -> AsyncIterator[int]:
    config = LimitedConfig(app, limits=HttpLimitsConfig.model_validate(limits), host="127.0.0.1", port=0,
                           lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server stopped before it started"
            await asyncio.sleep(0.02)
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), DEADLINE_S)
    return Answer(int(status_line.split()[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server ends the connection (EOF or reset) within the deadline."""
    try:
        while await asyncio.wait_for(reader.read(65536), DEADLINE_S):
            pass
    except ConnectionError:
        pass
    return True


async def get(port: int, path: str = "/", writer_reader: tuple | None = None) -> Answer:
    reader, writer = writer_reader or await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
    await writer.drain()
    return await read_answer(reader)


async def test_a_head_over_the_limit_gets_431_and_is_not_read_further() -> None:
    app = RecordingApp()
    async with limited_server(app, max_header_bytes=4096) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send_huge_header() -> None:
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET / HTTP/1.1\r\nhost: test\r\nx-big: ")
                for _ in range(64):  # 4 MiB in all, far more than the server will read
                    writer.write(b"a" * 65536)
                    await writer.drain()

        sending = asyncio.create_task(send_huge_header())
        answer = await read_answer(reader)
        assert answer.status == 431
        assert answer.headers["connection"] == "close"
        assert answer.headers["x-request-id"].startswith("req-")
        error = orjson.loads(answer.body)["error"]
        assert error["code"] == "request_header_fields_too_large"
        assert error["type"] == "invalid_request_error"
        assert await closed_by_server(reader)
        await asyncio.wait_for(sending, DEADLINE_S)
        writer.close()
    assert app.paths == []


async def test_a_head_within_the_limit_with_a_large_body_in_the_same_write_is_served() -> None:
    app = RecordingApp()
    async with limited_server(app, max_header_bytes=4096) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        padding = "x" * 3000  # the head stays under 4096 bytes; head and body together are far over
        body = b"b" * 200_000
        writer.write(f"POST /upload HTTP/1.1\r\nhost: test\r\nx-pad: {padding}\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        answer = await read_answer(reader)
        writer.close()
    assert answer.status == 200
    assert orjson.loads(answer.body) == {"body_bytes": len(body)}


async def test_a_head_sent_a_byte_at_a_time_is_cut_with_408_after_the_header_timeout() -> None:
    app = RecordingApp()
    async with limited_server(app, header_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        answer_task = asyncio.create_task(read_answer(reader))
        with contextlib.suppress(ConnectionError):
            for byte in b"GET / HTTP/1.1\r\nhost: test\r\nx-slow: " + b"s" * 200:
                if answer_task.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        answer = await answer_task
        assert answer.status == 408
        assert orjson.loads(answer.body)["error"]["code"] == "timeout"
        assert await closed_by_server(reader)
        assert time.monotonic() - started < DEADLINE_S
        writer.close()
    assert app.paths == []


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout() -> None:
    async with limited_server(RecordingApp(), header_timeout_s=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(100), DEADLINE_S) == b""  # closed without an answer
        writer.close()


async def test_a_trickled_body_is_cut_with_408_and_the_app_sees_a_disconnect() -> None:
    app = RecordingApp()
    async with limited_server(app, body_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nx-request-id: slow-body-1\r\n"
                     b"content-length: 1000\r\n\r\n{")
        answer_task = asyncio.create_task(read_answer(reader))
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                if answer_task.done():
                    break
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)
        answer = await answer_task
        assert answer.status == 408
        assert answer.headers["x-request-id"] == "slow-body-1"  # the head was complete: the client's id
        assert await closed_by_server(reader)
        writer.close()
    assert app.paths == ["/v1/chat/completions"]
    assert app.disconnects == 1


async def test_slow_handling_is_not_cut_and_a_kept_alive_connection_serves_several_requests() -> None:
    app = RecordingApp(delay_s=1.0)  # far longer than both deadlines: they bound the client, not the app
    async with limited_server(app, header_timeout_s=0.3, body_timeout_s=0.3) as port:
        connection = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            assert (await get(port, "/slow", connection)).status == 200
        # The next head on the same connection has its own deadline.
        reader, writer = connection
        writer.write(b"GET /stalled HTTP/1.1\r\n")
        assert (await read_answer(reader)).status == 408
        writer.close()
    assert app.paths == ["/slow"] * 3


async def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with limited_server(RecordingApp(), keep_alive_timeout_s=1, header_timeout_s=60) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await get(port, "/", (reader, writer))).status == 200
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), DEADLINE_S) == b""
        assert time.monotonic() - started < DEADLINE_S
        writer.close()


async def test_pipelined_requests_are_all_answered() -> None:
    app = RecordingApp()
    async with limited_server(app, max_header_bytes=1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Three heads of ~400 bytes in one write: more than max_header_bytes together, each within it.
        padding = "p" * 350
        writer.write(b"".join(f"POST /{n} HTTP/1.1\r\nhost: test\r\nx-pad: {padding}\r\n"
                              f"content-length: 2\r\n\r\n{n}{n}".encode() for n in range(3)))
        await writer.drain()
        answers = [await read_answer(reader) for _ in range(3)]
        writer.close()
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert app.paths == ["/0", "/1", "/2"]


async def test_a_pipelined_head_over_the_limit_closes_the_connection_without_answering_out_of_turn() -> None:
    app = RecordingApp(delay_s=0.5)
    async with limited_server(app, max_header_bytes=1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nhost: test\r\n\r\n"
                     b"GET /second HTTP/1.1\r\nhost: test\r\nx-big: " + b"b" * 4096 + b"\r\n\r\n")
        await writer.drain()
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), DEADLINE_S):
                received += chunk
        writer.close()
    # The 431 would have been read as the answer to /first: nothing is answered, the connection is closed.
    assert b" 431 " not in received
    assert app.paths == ["/first"]


async def test_above_max_connections_a_request_gets_429_but_health_paths_are_served() -> None:
    app = RecordingApp()
    async with limited_server(app, max_connections=16) as port:
        kept: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(16):
            connection = await asyncio.open_connection("127.0.0.1", port)
            assert (await get(port, "/v1/models", connection)).status == 200  # kept alive afterwards
            kept.append(connection)

        refused = await get(port, "/v1/models")
        assert refused.status == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert orjson.loads(refused.body)["error"]["code"] == "too_many_connections"
        assert (await get(port, "/health/live")).status == 200
        assert (await get(port, "/metrics")).status == 200

        for _, writer in kept[:4]:
            writer.close()
        deadline = time.monotonic() + DEADLINE_S
        while (await get(port, "/v1/models")).status != 200:
            assert time.monotonic() < deadline, "closing connections did not make room"
            await asyncio.sleep(0.1)
        for _, writer in kept[4:]:
            writer.close()
    assert app.paths.count("/v1/models") == 17
    assert app.paths.count("/health/live") == 1


async def test_a_refused_connection_is_closed_by_the_server_within_the_linger_time() -> None:
    async with limited_server(RecordingApp(), max_header_bytes=1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nx-big: " + b"a" * 4096)  # then the client goes quiet
        await writer.drain()
        assert (await read_answer(reader)).status == 431
        started = time.monotonic()
        assert await closed_by_server(reader)
        assert time.monotonic() - started < LINGER_S + DEADLINE_S
        writer.close()


def test_limits_are_validated_with_errors_that_name_the_field() -> None:
    config = {"worker": {"id": "w", "http": {"max_header_bytes": 10}},
              "models": [{"id": "m", "engine": "mock", "source": "m",
                          "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "1"}}]}
    with pytest.raises(ConfigError, match=r"worker\.http\.max_header_bytes"):
        parse_node_config(config)
    config["worker"]["http"] = {"header_timeout": 5}
    with pytest.raises(ConfigError, match=r"worker\.http\.header_timeout"):
        parse_node_config(config)
    del config["worker"]["http"]
    limits = NodeConfig.model_validate(config).worker.http
    assert (limits.max_header_bytes, limits.header_timeout_s, limits.body_timeout_s, limits.max_connections,
            limits.keep_alive_timeout_s) == (65536, 10.0, 30.0, 4096, 75)


def test_max_connections_over_the_open_file_limit_is_a_start_up_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_limits.resource, "getrlimit", lambda _: (1024, 2048))
    with pytest.raises(ConfigError, match=r"worker\.http\.max_connections"):
        ensure_open_files(HttpLimitsConfig(max_connections=4096))


def test_the_open_file_limit_is_raised_to_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, tuple[int, int]]] = []
    monkeypatch.setattr(http_limits.resource, "getrlimit", lambda _: (1024, 65536))
    monkeypatch.setattr(http_limits.resource, "setrlimit",
                        lambda which, limits: calls.append((which, limits)))
    ensure_open_files(HttpLimitsConfig(max_connections=4096))
    assert calls == [(resource.RLIMIT_NOFILE, (65536, 65536))]
