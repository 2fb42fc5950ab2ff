"""The HTTP server's limits (`worker.http`): what uvicorn's httptools protocol does not bound by itself.

uvicorn with httptools reads a request's headers without a size limit (llhttp has none; httptools
buffers a header value until it is complete) and without a deadline, and a fresh connection that never
sends a byte stays open for good; a body may trickle for ever. Its connection cap (`limit_concurrency`)
answers 503 once a request's head has arrived, which routers count against the node's uptime. So each
connection's protocol here adds:

- a cap on what is read of a request head (`max_header_bytes`): over it, 431 before any more is parsed;
- a deadline for the head (`header_timeout_s`, from the connection's opening or, on a kept-alive
  connection, from the head's first byte) and one for the body (`body_timeout_s`, from the end of the
  head): past either, 408 (a connection that sent nothing is closed without one, as an idle kept-alive
  connection is);
- a cap on open connections (`max_connections`): a request on a connection above it gets 429 with
  Retry-After, the router's signal to send it elsewhere without counting it as a failure of the node,
  except for health and metrics paths, which must answer while the node is flooded.

Every refusal is written with `connection: close`; the connection then keeps reading (and dropping)
what the client still sends for a short while, so that the client reads the answer instead of a reset.
uvicorn's own `timeout_keep_alive` bounds idle kept-alive connections. (Its `h11_max_incomplete_event_size`
bounds heads only in its h11 protocol, and the worker runs httptools.)
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import orjson
import uuid_utils
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from worker.config import ConfigError, HttpLimitsConfig
from worker.gateway.errors import ApiError
from worker.gateway.request_id import assign_request_id

logger = logging.getLogger("worker.gateway.http_limits")

# After a refusal, what the client still sends is read and dropped for this long, so that its request
# does not meet a reset before it reads the answer (as Apache's lingering close).
LINGER_S = 2.0
# Paths served even above max_connections: liveness probes and scrapes must answer during a flood.
EXEMPT_FROM_CONNECTION_CAP = frozenset({b"/health/live", b"/health/ready", b"/metrics"})
# Open files the worker process needs besides its clients' connections (engines, database, logs).
RESERVED_OPEN_FILES = 1024
# A kind of cut is logged at once, then at most once per this many seconds (with how many there were).
CUT_LOG_INTERVAL_S = 10.0


class CutLog:
    """Logs the connections the limits cut, without letting a flood of them flood the log."""

    def __init__(self) -> None:
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def cut(self, kind: str, message: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < CUT_LOG_INTERVAL_S:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._last_logged[kind] = now
        logger.info(message, extra={"cut": kind, "cuts_not_logged": self._unlogged.pop(kind, 0), **fields})


class LimitedConfig(uvicorn.Config):
    """uvicorn's configuration with the worker's HTTP limits, which every connection's protocol reads."""

    def __init__(self, app: Any, *, limits: HttpLimitsConfig, **kwargs: Any) -> None:
        # No WebSocket routes: an upgrade request is served as plain HTTP under the same limits.
        super().__init__(app, http=LimitedHttpToolsProtocol, ws="none",
                         timeout_keep_alive=limits.keep_alive_timeout_s, **kwargs)
        self.limits = limits
        self.cut_log = CutLog()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, head and body deadlines and a connection cap."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not isinstance(config, LimitedConfig):
            raise TypeError("LimitedHttpToolsProtocol needs a LimitedConfig")
        self.limits = config.limits
        self.cut_log = config.cut_log
        # Between requests and while a head is read: the next bytes belong to a request head.
        self.awaiting_head = True
        self.head_bytes = 0
        self.head_complete = False
        self.heads_read = 0
        self.over_cap = False
        self.refused = False
        self.deadline: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.over_cap = len(self.connections) > self.limits.max_connections
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after a refusal: read and dropped
        if not self.awaiting_head:
            super().data_received(data)
            return
        if self.deadline is None:  # the first byte of a head on a kept-alive connection
            self._arm(self.limits.header_timeout_s, self._head_timed_out)
        room = self.limits.max_header_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            super().data_received(data)
            return
        # The head may end within the allowed bytes and a body (or pipelined requests) follow in the
        # same read: parse up to the limit, and refuse only if no head was completed there. (A head that
        # began within those bytes is then counted from where they end, so it may read up to one read's
        # worth more than the limit.)
        heads_read = self.heads_read
        if room > 0:
            self.head_bytes += room
            super().data_received(data[:room])
        if self.refused or self.transport.is_closing():
            return
        if self.heads_read == heads_read:
            too_large = f"request line and headers exceed {self.limits.max_header_bytes} bytes"
            self._refuse(ApiError(431, too_large, code="request_header_fields_too_large",
                                  error_type="invalid_request_error"), kind="header_too_large")
            return
        self.data_received(data[room:])

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_complete = False

    def on_headers_complete(self) -> None:
        self._disarm()
        self.awaiting_head = False
        self.head_bytes = 0
        self.head_complete = True
        self.heads_read += 1
        if self.over_cap and self.url.split(b"?", 1)[0] not in EXEMPT_FROM_CONNECTION_CAP:
            self._refuse(ApiError(429, "this worker has too many open connections; retry shortly",
                                  code="too_many_connections", headers={"retry-after": "1"}),
                         kind="connection_cap")
            return
        super().on_headers_complete()
        self._arm(self.limits.body_timeout_s, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self._disarm()
        self.awaiting_head = True
        super().on_message_complete()

    # Deadlines and refusals

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.head_bytes == 0:
            # Nothing of a request came: closed as an idle kept-alive connection would be.
            self.cut_log.cut("idle", "connection closed: no request within the header timeout",
                             client=self._client_address(), timeout_s=self.limits.header_timeout_s)
            self.transport.close()
            return
        self._refuse(ApiError(408, f"request headers not received within {self.limits.header_timeout_s:g} s",
                              code="timeout"), kind="header_timeout")

    def _body_timed_out(self) -> None:
        self.deadline = None
        self._refuse(ApiError(408, f"request body not received within {self.limits.body_timeout_s:g} s",
                              code="timeout"), kind="body_timeout", own_cycle=True)

    def _refuse(self, error: ApiError, kind: str, *, own_cycle: bool = False) -> None:
        """Answer `error` and close the connection. `own_cycle`: the refused request is `self.cycle` (its
        head was read); otherwise it is a head being read, and `self.cycle` an earlier request."""
        self._disarm()
        self.refused = True
        # Once the head is complete the client's own id is known; a cut head gets a new one.
        request_id = (assign_request_id(dict(self.scope)) if self.head_complete
                      else f"req-{uuid_utils.uuid7().hex}")
        self.cut_log.cut(kind, error.message, request_id=request_id, client=self._client_address(),
                         status=error.status)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not own_cycle or cycle.response_started or self.pipeline:
                # A response is due first (an earlier pipelined request's) or being written: no answer
                # can be put in between, so the connection is only closed.
                self.transport.close()
                return
            # The application's receive() now answers http.disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(self._response(error, request_id))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then its end of the connection
        self.flow.resume_reading()
        self.deadline = self.loop.call_later(LINGER_S, self.transport.abort)

    def _response(self, error: ApiError, request_id: str) -> bytes:
        body = orjson.dumps(error.body())
        headers = [*self.server_state.default_headers,
                   (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"x-request-id", request_id.encode()),
                   *((name.encode(), value.encode()) for name, value in error.headers.items()),
                   (b"connection", b"close")]
        lines = [name + b": " + value + b"\r\n" for name, value in headers]
        return b"".join([STATUS_LINE[error.status], *lines, b"\r\n", body])

    def _client_address(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else ""


def ensure_open_files(limits: HttpLimitsConfig) -> None:
    """Raise this process's open-file limit to its hard limit, which must leave room for max_connections.

    Past the limit, accept() fails and connections wait in the kernel's backlog instead of being
    answered; containers often start with a soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = limits.max_connections + RESERVED_OPEN_FILES
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"worker.http.max_connections: {limits.max_connections} connections need {needed} "
                          f"open files, and this process may open at most {hard} (RLIMIT_NOFILE); lower "
                          "max_connections or raise the nofile limit")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
