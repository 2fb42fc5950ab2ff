"""What the worker process and a relay process say to each other (see coordinator.py), defined once.

Every message is a tagged msgspec struct; worker.processes.rpc carries them. What a message copies from
or into a request's context is written here, next to its fields, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import msgspec

from worker.config import ModelConfig
from worker.gateway.context import RequestContext, Usage
from worker.gateway.errors import ApiError


class Hello(msgspec.Struct, tag="hello"):
    """Worker -> relay, first: who the relay is and what it serves."""

    index: int
    config: dict[str, Any]  # NodeConfig in its JSON form
    internal: str  # the worker process's own socket, for every request that is not inference
    log_level: str


class Begin(msgspec.Struct, tag="begin"):
    """Relay -> worker (a call): admit this request; answered by Admitted or Refused."""

    record: str
    request_id: str
    endpoint: str
    path: str
    model: str
    body: dict[str, Any]
    stream: bool
    wants_usage: bool
    headers: list[tuple[bytes, bytes]]  # the client's, as the ASGI scope holds them
    received_at: float
    started: float
    size: int
    session: str | None

    @classmethod
    def of(cls, ctx: RequestContext, path: str, headers: list[tuple[bytes, bytes]]) -> Begin:
        return cls(record=ctx.record_id, request_id=ctx.request_id, endpoint=ctx.endpoint, path=path,
                   model=ctx.model.id, body=ctx.body, stream=ctx.stream, wants_usage=ctx.client_wants_usage,
                   headers=headers, received_at=ctx.received_at, started=ctx.started_monotonic,
                   size=ctx.body_bytes, session=ctx.session_key)

    def context(self, model: ModelConfig, gateway_process: int) -> RequestContext:
        return RequestContext(
            request_id=self.request_id, endpoint=self.endpoint, model=model, body=self.body, stream=self.stream,
            client_wants_usage=self.wants_usage, headers={}, record_id=self.record, received_at=self.received_at,
            started_monotonic=self.started, gateway_process=gateway_process, body_bytes=self.size,
            session_key=self.session,
        )

    def scope(self) -> dict[str, Any]:
        """The ASGI scope the worker process's hooks read the request's headers from."""
        return {"type": "http", "method": "POST", "path": self.path, "headers": self.headers, "query_string": b""}


class Admitted(msgspec.Struct, tag="admitted"):
    """Worker -> relay, the answer to Begin or Readmit: the replica leased for the request."""

    replica: str
    url: str
    headers: dict[str, str]  # what the hooks add to the response
    extras: dict[str, Any]  # what the hooks add to `usage` beside its cost, which the relay prices itself


class Refused(msgspec.Struct, tag="refused"):
    """Worker -> relay, the answer to Begin or Readmit: the error the client gets."""

    status: int
    message: str
    code: str | None
    param: str | None
    error_type: str
    headers: dict[str, str]

    @classmethod
    def of(cls, error: ApiError) -> Refused:
        return cls(status=error.status, message=error.message, code=error.code, param=error.param,
                   error_type=error.error_type, headers=error.headers)

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, code=self.code, param=self.param, error_type=self.error_type,
                        headers=self.headers)


class Readmit(msgspec.Struct, tag="readmit"):
    """Relay -> worker (a call): the replica failed before answering; lease a sibling, or refuse."""

    record: str


class Abandon(msgspec.Struct, tag="abandon"):
    """Relay -> worker: the client left while the request was being admitted."""

    record: str


class Release(msgspec.Struct, tag="release"):
    """Relay -> worker: the request no longer needs its replica (its metering is still to come)."""

    record: str


class FirstByte(msgspec.Struct, tag="first_byte"):
    """Relay -> worker: a streamed request's first byte came from its engine at `at` (monotonic time, the
    same clock in every process of the machine): its GPU-time share now weighs as decoding."""

    record: str
    at: float


class Finish(msgspec.Struct, tag="finish"):
    """Relay -> worker (a call): the request ended; answered by Finished once it is recorded."""

    record: str
    status_code: int
    usage: Usage | None
    usage_estimated: bool
    admitted: float | None
    first_byte: float | None
    finished: float | None
    streamed_events: int
    finish_reason: str | None
    outcome: str
    error_message: str | None
    gpu_seconds: float | None = None  # the engine's own figure, when it reported one

    @classmethod
    def of(cls, ctx: RequestContext) -> Finish:
        return cls(record=ctx.record_id, status_code=ctx.status_code, usage=ctx.usage,
                   usage_estimated=ctx.usage_estimated, admitted=ctx.admitted_monotonic,
                   first_byte=ctx.first_byte_monotonic, finished=ctx.finished_monotonic,
                   streamed_events=ctx.streamed_events, finish_reason=ctx.finish_reason, outcome=ctx.outcome,
                   error_message=ctx.error_message, gpu_seconds=ctx.gpu_seconds)

    def apply_to(self, ctx: RequestContext) -> None:
        """Everything the relay learnt about the request, into the worker process's context of it."""
        if self.gpu_seconds is not None:
            ctx.gpu_seconds = self.gpu_seconds
        ctx.usage = self.usage
        ctx.usage_estimated = self.usage_estimated
        ctx.status_code = self.status_code
        ctx.admitted_monotonic = self.admitted
        ctx.first_byte_monotonic = self.first_byte
        ctx.streamed_events = self.streamed_events
        ctx.finish_reason = self.finish_reason
        ctx.outcome = self.outcome
        ctx.error_message = self.error_message


class Finished(msgspec.Struct, tag="finished"):
    """Worker -> relay, the answer to Finish: with the request's GPU-seconds as recorded (None: not settled)."""

    gpu_seconds: float | None = None


class Interrupt(msgspec.Struct, tag="interrupt"):
    """Worker -> relay: end this request now (its replica is restarting, or the worker is draining)."""

    record: str
    reason: str


ToWorker = Begin | Readmit | Abandon | Release | FirstByte | Finish
ToRelay = Hello | Admitted | Refused | Finished | Interrupt
