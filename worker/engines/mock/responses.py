"""An ASGI response that watches for the client going away, so abandoned requests leave the batch."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# Returns False when the connection must be cut (the abort_midstream fault).
Producer = Callable[[Send], Awaitable[bool]]


class ConnectionCut(Exception):
    """Raised after a response has started so the server drops the connection mid-body."""


class WatchedResponse(Response):
    """Runs `produce` while listening for `http.disconnect`; `on_close` runs however it ends.

    vLLM aborts a request when its HTTP client disconnects, streaming or not; this does the same.
    """

    def __init__(self, produce: Producer, on_close: Callable[[], None]) -> None:
        super().__init__(status_code=200)
        self._produce = produce
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = True
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                with contextlib.suppress(OSError):  # the client went away while we were writing
                    completed = await self._produce(send)
                group.cancel_scope.cancel()
        finally:
            self._on_close()
        if not completed:
            raise ConnectionCut("connection cut on purpose (abort_midstream fault)")


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def sse_start(send: Send) -> Awaitable[None]:
    return send({"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})


def json_start(send: Send, status: int, length: int) -> Awaitable[None]:
    return send({"type": "http.response.start", "status": status,
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]})
