"""A registry stand-in for tests: a FastAPI app under uvicorn on 127.0.0.1 that records every call it gets
and answers with scripted failures (a status per call kind, consumed in order)."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

PREFIX = "/registry/v1"


@dataclass(frozen=True)
class Call:
    kind: str  # announce | heartbeat | draining | deregister
    worker_id: str
    authorization: str | None
    body: Any
    status: int


@dataclass
class Receiver:
    calls: list[Call] = field(default_factory=list)
    # Statuses to answer, per call kind, before answering normally.
    scripted: dict[str, deque[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, kind: str, *statuses: int) -> None:
        with self.lock:
            self.scripted.setdefault(kind, deque()).extend(statuses)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.scripted.clear()

    def of(self, kind: str, status: int | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.kind == kind and (status is None or c.status == status)]

    def kinds(self) -> list[str]:
        with self.lock:
            return [c.kind for c in self.calls]

    async def record(self, kind: str, worker_id: str | None, request: Request) -> Response:
        raw = await request.body()
        body = orjson.loads(raw) if raw else None
        if worker_id is None:  # an announcement names the worker in its body
            worker_id = body.get("worker_id", "") if isinstance(body, dict) else ""
        with self.lock:
            queue = self.scripted.get(kind)
            status = queue.popleft() if queue else (204 if kind == "deregister" else 200)
            self.calls.append(Call(kind, worker_id, request.headers.get("authorization"), body, status))
        answer = b"" if status == 204 else orjson.dumps({"ok": status < 400})
        return Response(answer, status_code=status, media_type=None if status == 204 else "application/json")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get(PREFIX)
        async def root() -> Response:
            return Response(b"{}", media_type="application/json")

        @app.post(f"{PREFIX}/workers")
        async def announce(request: Request) -> Response:
            return await self.record("announce", None, request)

        @app.post(f"{PREFIX}/workers/{{worker_id}}/heartbeat")
        async def heartbeat(worker_id: str, request: Request) -> Response:
            return await self.record("heartbeat", worker_id, request)

        @app.post(f"{PREFIX}/workers/{{worker_id}}/draining")
        async def draining(worker_id: str, request: Request) -> Response:
            return await self.record("draining", worker_id, request)

        @app.delete(f"{PREFIX}/workers/{{worker_id}}")
        async def deregister(worker_id: str, request: Request) -> Response:
            return await self.record("deregister", worker_id, request)

        return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ReceiverServer:
    """uvicorn in a thread of its own (no signal handlers there), stopped by `close()`."""

    def __init__(self, receiver: Receiver) -> None:
        self.port = free_port()
        config = uvicorn.Config(receiver.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="registry-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def open(self) -> ReceiverServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("registry receiver did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
