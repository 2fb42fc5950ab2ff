"""The inference request path, stage by stage (see pipeline.py): check, admit, dispatch, relay, record."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from worker.config import NodeConfig
from worker.engines.data_client import EngineResponse, EngineTransportError, abort, finish
from worker.gateway.context import RequestContext, RequestView, Usage
from worker.gateway.errors import ApiError, api_error, normalise_engine_error
from worker.gateway.hooks import RequestHooks
from worker.gateway.leasing import EngineTarget, Lease, Leaser
from worker.gateway.pipeline import HookChain
from worker.gateway.relay import (
    Outcome,
    RelayStreamResponse,
    add_usage_extras,
    open_upstream,
    race,
    take_engine_gpu_seconds,
)
from worker.gateway.request_id import SCOPE_KEY
from worker.gateway.requests import parse_body, read_body, session_key
from worker.refusals import ClientDisconnected, Refusal

logger = logging.getLogger(__name__)

# The request's GPU time (see context.RequestContext.gpu_seconds), on answers that are not streamed.
GPU_SECONDS_HEADER = "x-worker-gpu-seconds"

ENDPOINT_PATHS = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class RequestTicket:
    """What one inference request holds from its check-in to its end, and the one place it is given back.

    The hooks that admitted the request (its balance hold, rate-limit debit, ledger record) are finalized
    through `hooks`, exactly once; `lease` is the replica slot it occupies. `close()` releases the lease
    and finalizes whatever is not finalized yet; `failed()` first marks a request that ended on an
    unexpected exception as the worker's own failure (recorded, charged nothing).
    """

    __slots__ = ("ctx", "hooks", "lease")

    def __init__(self, ctx: RequestContext, hooks: Sequence[RequestHooks]) -> None:
        self.ctx = ctx
        self.hooks = HookChain(ctx, hooks)
        self.lease: Lease | None = None

    def held_lease(self) -> Lease:
        if self.lease is None:
            raise RuntimeError("the request holds no replica lease")
        return self.lease

    def failed(self, error: BaseException) -> None:
        if self.hooks.done:
            return
        ctx = self.ctx
        ctx.outcome = "worker_error"
        ctx.status_code = max(ctx.status_code, 500)
        ctx.error_message = f"internal error in the worker gateway: {type(error).__name__}"

    async def close(self) -> None:
        """Stage 8 (and 7 for whatever did not record itself on the way)."""
        if self.lease is not None:
            self.lease.release()
        if not self.hooks.done:
            if self.ctx.outcome == "ok" and not self.ctx.status_code:
                self.ctx.outcome, self.ctx.status_code = "worker_error", 500
            await self.hooks()


class Gateway:
    def __init__(self, config: NodeConfig, leaser: Leaser, hooks: Sequence[RequestHooks] = ()) -> None:
        self.config = config
        self.leaser = leaser
        # In `pipeline.request_hooks` order; set once before the first request.
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
                ctx = await self.request_context(request, endpoint)  # 1. parse and validate
                ticket = RequestTicket(ctx, self.hooks)
                view = RequestView(path=scope["path"], headers=request.headers, receive=receive)
                # 2-4. authenticate, reserve, admit or queue
                ticket.lease = await self.check_in(ctx, view, ticket.hooks, receive=receive)
                response = await self.dispatch(receive, ticket)  # 5-6. dispatch and relay (7 for answers)
            except ApiError as error:
                if ticket is not None:
                    await self.answered_with(error, ticket.ctx, ticket.hooks)
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
                await ticket.close()  # 7-8. record what is not yet, release the lease

    def hook_chain(self, ctx: RequestContext) -> HookChain:
        """A request's way through this gateway's hooks (for requests it checks in but does not serve)."""
        return HookChain(ctx, self.hooks)

    @staticmethod
    async def answered_with(error: ApiError, ctx: RequestContext, chain: HookChain) -> None:
        """The request ends with `error`: record it (unless that happened already) and give the error the
        headers the hooks set (the one place they are merged into an error)."""
        if not chain.done:
            ctx.outcome = "rejected"
            ctx.status_code = error.status
            ctx.error_message = error.message
            await chain()
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

    async def check_in(self, ctx: RequestContext, request: RequestView, chain: HookChain,
                       receive: Receive | None = None) -> Lease:
        """Every hook's `before_request` in order, then a replica's lease (after queueing for one if need
        be); raises the first refusal as an ApiError, or ClientDisconnected when `receive` says the client
        left meanwhile.

        Only hooks that admitted the request finalize it. Admission's refusal, which no engine saw, is
        finalized right after the answer rather than before it.
        """
        try:
            await chain.check_in(request)
        except Refusal as refusal:
            raise api_error(refusal) from None
        try:
            lease = await self.admit(ctx, receive=receive)
        except ApiError as refusal:
            ctx.outcome, ctx.status_code, ctx.error_message = "rejected", refusal.status, refusal.message
            self.finalize_soon(chain)
            raise
        except ClientDisconnected:
            ctx.outcome, ctx.status_code = "client_disconnected", 499
            self.finalize_soon(chain)
            raise
        ctx.admitted_monotonic = time.monotonic()
        return lease

    def finalize_soon(self, chain: HookChain, finished_monotonic: float | None = None) -> asyncio.Future[None]:
        """Start the hooks' finalize without waiting for it; `aclose()` waits for it."""
        finalizing = chain.start(finished_monotonic)
        self._finalizing.add(finalizing)
        finalizing.add_done_callback(self._finalizing.discard)
        return finalizing

    async def admit(self, ctx: RequestContext, exclude: EngineTarget | None = None,
                    receive: Receive | None = None) -> Lease:
        """Stage 4: the lease of the replica that serves `ctx`, bound at once or after waiting in the
        model's queue; raises the refusal as an ApiError, or ClientDisconnected when the client left while
        queued."""
        try:
            return await self.leaser.lease(ctx, exclude=exclude, receive=receive)
        except Refusal as refusal:
            raise api_error(refusal) from None

    def engine_payload(self, ctx: RequestContext) -> bytes:
        """The body the engine receives: the validated one, always asking the engine for usage."""
        if ctx.stream:
            ctx.body["stream_options"] = {**(ctx.body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(ctx.body)

    async def dispatch(self, receive: Receive, ticket: RequestTicket) -> Response:
        """Stages 5 and 6: send the request to its replica (a sibling when that one cannot take it before
        any byte was sent) and answer with what the engine says, whole or as a stream."""
        ctx, chain, lease = ticket.ctx, ticket.hooks, ticket.held_lease()
        payload = self.engine_payload(ctx)
        try:
            outcome, opening = await self._open(receive, lease, ctx, payload)
        except ApiError as error:
            lease.release()
            if error.status != 503:
                raise
            # The replica died or is restarting: shed to a sibling before any byte was sent.
            try:
                lease = ticket.lease = await self.admit(ctx, exclude=lease.replica)
            except ApiError:
                raise error from None
            outcome, opening = await self._open(receive, lease, ctx, payload)
        replica = lease.replica
        ctx.replica = replica
        chain.routed()
        headers = {"x-worker-replica": replica.replica_id, **ctx.response_headers}
        if outcome is Outcome.timed_out:
            # The engine is slow to answer a stream: send headers now, keep-alives until it does.
            return RelayStreamResponse(opening, ctx, chain, headers, lease, self.keepalive_s)
        if outcome is Outcome.disconnected:
            ctx.outcome = "client_disconnected"
            return Response(status_code=499)
        upstream = opening.result()
        if upstream.status == 200 and ctx.stream:
            return RelayStreamResponse(opening, ctx, chain, headers, lease, self.keepalive_s)
        try:
            if upstream.status != 200:
                return await self._engine_error(upstream, ctx, chain, headers)
            return await self._complete(receive, upstream, lease, ctx, chain, headers)
        finally:
            lease.release()

    async def _open(self, receive: Receive, lease: Lease, ctx: RequestContext,
                    payload: bytes) -> tuple[Outcome, asyncio.Future[EngineResponse]]:
        """Send the request to the engine and wait for its headers (for a stream, at most the keep-alive interval).

        Raises ApiError 503 when the replica cannot take it after all (unreachable, or restarting).
        """
        replica = lease.replica
        opening = asyncio.ensure_future(open_upstream(replica, ENDPOINT_PATHS[ctx.endpoint], payload, ctx))
        outcome = await race(opening, receive=receive, interrupted=lease.interrupted,
                             timeout_s=self.keepalive_s if ctx.stream else None)
        if outcome is Outcome.interrupted:
            raise ApiError(503, f"model '{ctx.model.id}' replica {replica.replica_id} is restarting; retry shortly",
                           headers={"retry-after": "1"})
        if outcome is Outcome.done:
            opening.result()  # raises the ApiError of a connection failure
        return outcome, opening

    async def _engine_error(self, upstream: EngineResponse, ctx: RequestContext, chain: HookChain,
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
        await chain()
        return Response(normalise_engine_error(status, payload),
                        status_code=status, media_type="application/json", headers=headers)

    async def _complete(self, receive: Receive, upstream: EngineResponse, lease: Lease,
                        ctx: RequestContext, chain: HookChain, headers: dict[str, str]) -> Response:
        reading = asyncio.ensure_future(upstream.read())
        outcome = Outcome.interrupted
        try:
            outcome = await race(reading, receive=receive, interrupted=lease.interrupted)
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
            await chain()
            return Response(status_code=499)
        if outcome is Outcome.interrupted:
            message = ctx.error_message or lease.interruption_reason or "the engine stopped before answering"
            failure = ApiError(502, f"engine replica {lease.replica.replica_id} failed before answering: {message}")
            ctx.outcome, ctx.status_code, ctx.error_message = "upstream_failed", 502, failure.message
            await chain()
            raise failure
        ctx.status_code = 200
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            usage = data.get("usage")
            engine_figure = isinstance(usage, dict) and take_engine_gpu_seconds(ctx, usage)
            ctx.usage = Usage.from_openai(usage)
            reasons = [c.get("finish_reason") for c in data.get("choices") or () if isinstance(c, dict)]
            ctx.finish_reason = "error" if "error" in reasons else next((r for r in reasons if r), None)
            if isinstance(usage, dict) and (add_usage_extras(chain, usage) or engine_figure):
                payload = orjson.dumps(data)
        await chain()
        if ctx.gpu_seconds is not None:
            # Known only once the answer is whole: streams carry it in the ledger, not in a header.
            headers = {**headers, GPU_SECONDS_HEADER: f"{ctx.gpu_seconds:.6f}"}
        return Response(payload, status_code=200, media_type="application/json", headers=headers)
