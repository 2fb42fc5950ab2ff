"""The inference request path: check, admit, relay, meter."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from worker.config import NodeConfig
from worker.engines.data_client import EngineResponse, EngineTransportError, abort, finish
from worker.engines.replica import Replica, ReplicaLease
from worker.gateway.context import RequestContext, Usage
from worker.gateway.errors import ApiError, ClientDisconnected, normalise_engine_error
from worker.gateway.hooks import RequestHooks
from worker.gateway.relay import Finalizer, Outcome, RelayStreamResponse, open_upstream, race
from worker.gateway.request_id import SCOPE_KEY
from worker.gateway.requests import parse_body, read_body, session_key

logger = logging.getLogger(__name__)

ENDPOINT_PATHS = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class ReplicaAdmission(Protocol):
    def admit_now(self, ctx: RequestContext, exclude: Replica | None = None) -> ReplicaLease | None:
        """Lease a replica with room for `ctx` now; None when it should queue (never with `exclude`);
        raises the ApiError that refuses it (400/429/503)."""
        ...

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        """Queue `ctx` until a replica has room; raises the ApiError that refuses it (429/503)."""
        ...


class RequestTicket:
    """What one inference request holds from its check-in to its end, and the one place it is given back.

    The hooks that admitted the request (its balance hold, rate-limit debit, ledger record) are finalized
    through `finalizer`, exactly once; `lease` is the replica slot it occupies. `close()` releases the lease
    and finalizes whatever is not finalized yet; `failed()` first marks a request that ended on an
    unexpected exception as the worker's own failure (recorded, charged nothing).
    """

    __slots__ = ("ctx", "finalizer", "lease")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.finalizer = Finalizer(ctx, [])
        self.lease: ReplicaLease | None = None

    def held_lease(self) -> ReplicaLease:
        if self.lease is None:
            raise RuntimeError("the request holds no replica lease")
        return self.lease

    def failed(self, error: BaseException) -> None:
        if self.finalizer.done:
            return
        ctx = self.ctx
        ctx.outcome = "worker_error"
        ctx.status_code = max(ctx.status_code, 500)
        ctx.error_message = f"internal error in the worker gateway: {type(error).__name__}"

    async def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
        if not self.finalizer.done:
            if self.ctx.outcome == "ok" and not self.ctx.status_code:
                self.ctx.outcome, self.ctx.status_code = "worker_error", 500
            await self.finalizer()


class Gateway:
    def __init__(self, config: NodeConfig, admission: ReplicaAdmission, hooks: Sequence[RequestHooks]) -> None:
        self.config = config
        self.admission = admission
        self.hooks = list(hooks)
        self.keepalive_s = config.worker.sse_keepalive_interval_s
        self._finalizing: set[asyncio.Future[None]] = set()

    async def aclose(self) -> None:
        """Wait for the hooks still finishing requests nobody waits for (before their stores close)."""
        await asyncio.gather(*self._finalizing, return_exceptions=True)

    async def serve(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one inference request, from its body to its last byte.

        Whatever the request took (its hooks' holds and ledger record, its replica lease) belongs to its
        `RequestTicket`, which is closed when this returns, whatever happened on the way: an unexpected
        exception ends the request as a recorded failure of the worker's, with everything given back.
        """
        request_id = scope[SCOPE_KEY]
        request = Request(scope, receive)
        ticket: RequestTicket | None = None
        try:
            try:
                ctx = await self.request_context(request, endpoint)
                ticket = RequestTicket(ctx)
                response = await self.handle(request, ticket)
            except ApiError as error:
                if ticket is not None:
                    await self.answered_with(error, ticket.ctx, ticket.finalizer)
                response = error.to_response()
            except ClientDisconnected:
                response = Response(status_code=499)  # nobody reads it
            except Exception as error:  # a fault of the worker's own
                logger.exception("unhandled error", extra={"request_id": request_id})
                if ticket is not None:  # recorded before the answer, like every answer
                    ticket.failed(error)
                    await ticket.close()
                response = ApiError(500, "internal error in the worker gateway").to_response()
            response.raw_headers.append((b"x-request-id", request_id.encode()))
            await response(scope, receive, send)
        except Exception as error:
            if ticket is not None:
                ticket.failed(error)
            logger.exception("failed while sending the response", extra={"request_id": request_id})
            raise
        finally:
            if ticket is not None:
                await ticket.close()

    async def handle(self, request: Request, ticket: RequestTicket) -> Response:
        """Check the request in and serve it; raises the ApiError that refuses it."""
        ticket.lease = await self.check_in(ticket.ctx, request, ticket.finalizer, receive=request.receive)
        return await self._serve(request, ticket)

    @staticmethod
    async def answered_with(error: ApiError, ctx: RequestContext, finalizer: Finalizer) -> None:
        """The request ends with `error`: record it (unless that happened already) and give the error the
        headers the hooks set."""
        if not finalizer.done:
            ctx.outcome = "rejected"
            ctx.status_code = error.status
            ctx.error_message = error.message
            await finalizer()
        error.headers = {**ctx.response_headers, **error.headers}

    async def request_context(self, request: Request, endpoint: str) -> RequestContext:
        """Read and check the request's body: the model must exist here and serve this endpoint."""
        raw = await read_body(request, self.config.worker.max_body_bytes)
        body, head = parse_body(endpoint, raw)
        model = self.config.model(head.model)
        if model is None:
            raise ApiError(404, f"The model '{head.model}' does not exist on this worker",
                           code="model_not_found", param="model")
        if (endpoint == "embeddings") != (model.task == "embed"):
            kind = "an embedding" if model.task == "embed" else "a generation"
            raise ApiError(400, f"model '{model.id}' is {kind} model and does not serve /{endpoint.replace('.', '/')}",
                           code="unsupported_endpoint", param="model")
        stream = bool(getattr(head, "stream", False))
        options = getattr(head, "stream_options", None)
        return RequestContext(
            request_id=request.scope[SCOPE_KEY], endpoint=endpoint, model=model, body=body,
            stream=stream, client_wants_usage=stream and bool(options and options.include_usage),
            headers={}, body_bytes=len(raw), session_key=session_key(model, request.headers, body),
        )

    async def check_in(self, ctx: RequestContext, request: Request, finalizer: Finalizer,
                       receive: Receive | None = None) -> ReplicaLease:
        """Every hook's `before_request` in order, then a replica's lease (after queueing for one if need
        be); raises the first refusal, or ClientDisconnected when `receive` says the client left meanwhile.

        Only hooks that admitted the request finalize it. Admission's refusal, which no engine saw, is
        finalized right after the answer rather than before it.
        """
        for passed, hook in enumerate(self.hooks, start=1):
            await hook.before_request(ctx, request)
            finalizer.hooks = self.hooks[:passed]
        try:
            lease = await self.admit(ctx, receive=receive)
        except ApiError as refusal:
            ctx.outcome, ctx.status_code, ctx.error_message = "rejected", refusal.status, refusal.message
            self.finalize_soon(finalizer)
            raise
        except ClientDisconnected:
            ctx.outcome, ctx.status_code = "client_disconnected", 499
            self.finalize_soon(finalizer)
            raise
        ctx.admitted_monotonic = time.monotonic()
        return lease

    def finalize_soon(self, finalizer: Finalizer, finished_monotonic: float | None = None) -> asyncio.Future[None]:
        """Start the hooks' finalize without waiting for it; `aclose()` waits for it."""
        finalizing = finalizer.start(finished_monotonic)
        self._finalizing.add(finalizing)
        finalizing.add_done_callback(self._finalizing.discard)
        return finalizing

    async def admit(self, ctx: RequestContext, exclude: Replica | None = None,
                    receive: Receive | None = None) -> ReplicaLease:
        """The lease of the replica that serves `ctx`, bound at once or after waiting in the model's queue;
        raises the refusal (400/429/503), or ClientDisconnected when the client left while queued."""
        lease = self.admission.admit_now(ctx, exclude)
        if lease is not None:
            return lease
        waiting = asyncio.ensure_future(self.admission.wait_for_slot(ctx, ctx.body_bytes))
        if receive is None:
            return await waiting
        if await race(waiting, receive=receive) is Outcome.disconnected:
            raise ClientDisconnected("the client left while its request was queued")
        return waiting.result()

    def engine_payload(self, ctx: RequestContext) -> bytes:
        """The body the engine receives: the validated one, always asking the engine for usage."""
        if ctx.stream:
            ctx.body["stream_options"] = {**(ctx.body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(ctx.body)

    async def _serve(self, request: Request, ticket: RequestTicket) -> Response:
        ctx, finalizer, lease = ticket.ctx, ticket.finalizer, ticket.held_lease()
        payload = self.engine_payload(ctx)
        try:
            outcome, opening = await self._open(request, lease, ctx, payload)
        except ApiError as error:
            lease.release()
            if error.status != 503:
                raise
            # The replica died or is restarting: shed to a sibling before any byte was sent.
            try:
                lease = ticket.lease = await self.admit(ctx, exclude=lease.replica)
            except ApiError:
                raise error from None
            outcome, opening = await self._open(request, lease, ctx, payload)
        replica = lease.replica
        ctx.replica = replica
        for hook in finalizer.hooks:
            hook.after_route(ctx)
        headers = {"x-worker-replica": replica.replica_id, **ctx.response_headers}
        if outcome is Outcome.timed_out:
            # The engine is slow to answer a stream: send headers now, keep-alives until it does.
            return RelayStreamResponse(opening, ctx, finalizer, headers, lease, self.keepalive_s)
        if outcome is Outcome.disconnected:
            ctx.outcome = "client_disconnected"
            return Response(status_code=499)
        upstream = opening.result()
        if upstream.status == 200 and ctx.stream:
            return RelayStreamResponse(opening, ctx, finalizer, headers, lease, self.keepalive_s)
        try:
            if upstream.status != 200:
                return await self._engine_error(upstream, ctx, finalizer, headers)
            return await self._complete(request, upstream, lease, ctx, finalizer, headers)
        finally:
            lease.release()

    async def _open(self, request: Request, lease: ReplicaLease, ctx: RequestContext,
                    payload: bytes) -> tuple[Outcome, asyncio.Future[EngineResponse]]:
        """Send the request to the engine and wait for its headers (for a stream, at most the keep-alive interval).

        Raises ApiError 503 when the replica cannot take it after all (unreachable, or restarting).
        """
        replica = lease.replica
        opening = asyncio.ensure_future(open_upstream(replica, ENDPOINT_PATHS[ctx.endpoint], payload, ctx))
        outcome = await race(opening, receive=request.receive, interrupted=lease.interrupted,
                             timeout_s=self.keepalive_s if ctx.stream else None)
        if outcome is Outcome.interrupted:
            raise ApiError(503, f"model '{ctx.model.id}' replica {replica.replica_id} is restarting; retry shortly",
                           headers={"retry-after": "1"})
        if outcome is Outcome.done:
            opening.result()  # raises the ApiError of a connection failure
        return outcome, opening

    async def _engine_error(self, upstream: EngineResponse, ctx: RequestContext, finalizer: Finalizer,
                            headers: dict[str, str]) -> Response:
        status = upstream.status
        try:
            payload = await upstream.read()
        except EngineTransportError:
            payload = b""
        finally:
            upstream.release()
        ctx.first_byte_monotonic = time.monotonic()
        ctx.status_code = status
        ctx.outcome = "invalid_request" if status < 500 else "engine_error"
        await finalizer()
        return Response(normalise_engine_error(status, payload),
                        status_code=status, media_type="application/json", headers=headers)

    async def _complete(self, request: Request, upstream: EngineResponse, lease: ReplicaLease,
                        ctx: RequestContext, finalizer: Finalizer, headers: dict[str, str]) -> Response:
        reading = asyncio.ensure_future(upstream.read())
        outcome = Outcome.interrupted
        try:
            outcome = await race(reading, receive=request.receive, interrupted=lease.interrupted)
            payload = reading.result() if outcome is Outcome.done else b""
        except EngineTransportError as error:
            outcome, payload = Outcome.interrupted, b""
            ctx.error_message = f"engine connection failed: {type(error).__name__}"
        finally:
            if outcome is Outcome.done:
                await finish(upstream)
            else:
                abort(upstream)  # the engine sees the connection go and aborts the request
        ctx.first_byte_monotonic = time.monotonic()
        if outcome is Outcome.disconnected:
            ctx.outcome = "client_disconnected"
            await finalizer()
            return Response(status_code=499)
        if outcome is Outcome.interrupted:
            message = ctx.error_message or lease.interruption_reason or "the engine stopped before answering"
            failure = ApiError(502, f"engine replica {lease.replica.replica_id} failed before answering: {message}")
            ctx.outcome, ctx.status_code, ctx.error_message = "upstream_failed", 502, failure.message
            await finalizer()
            raise failure
        ctx.status_code = 200
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            ctx.usage = Usage.from_openai(data.get("usage"))
            reasons = [c.get("finish_reason") for c in data.get("choices") or () if isinstance(c, dict)]
            ctx.finish_reason = "error" if "error" in reasons else next((r for r in reasons if r), None)
            extras = finalizer.usage_extras()
            if extras and isinstance(data.get("usage"), dict):
                data["usage"].update(extras)
                payload = orjson.dumps(data)
        await finalizer()
        return Response(payload, status_code=200, media_type="application/json", headers=headers)
