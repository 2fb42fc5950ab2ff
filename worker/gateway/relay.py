"""Relay one request to its engine replica and the answer back, streaming bytes as they arrive.

Streams are forwarded block by block without decoding; only blocks that can hold the usage chunk, a
finish reason, an engine error or `[DONE]` are looked into.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from worker.engines.data_client import (
    EngineConnectError,
    EngineResponse,
    EngineTransportError,
    abort,
    finish,
)
from worker.gateway.context import RequestContext, Usage
from worker.gateway.errors import ApiError, normalise_engine_error
from worker.gateway.leasing import EngineTarget, Lease
from worker.gateway.pipeline import HookChain

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
_FINISH_REASON = re.compile(rb'"finish_reason":"([a-z_]+)"')
_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def add_usage_extras(chain: HookChain, usage: dict[str, Any]) -> bool:
    """Merge the hooks' usage extras into the client's `usage` object; False when they add nothing."""
    extras = chain.usage_extras()
    usage.update(extras)
    return bool(extras)


def take_engine_gpu_seconds(ctx: RequestContext, usage: dict[str, Any]) -> bool:
    """The engine's own figure of the request's GPU time (`usage.gpu_seconds`, an extension vLLM does not
    send), in replica-seconds: into `ctx` as GPU-seconds, and out of the client's usage. True when it was there."""
    seconds = usage.pop("gpu_seconds", None)
    if seconds is None:
        return False
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
        ctx.gpu_seconds = float(seconds) * ctx.model.gpus_per_replica
    return True


async def open_upstream(replica: EngineTarget, path: str, payload: bytes, ctx: RequestContext) -> EngineResponse:
    try:
        return await replica.data.post(path, payload, ctx.request_id)
    except EngineConnectError as error:
        raise ApiError(503, f"model '{ctx.model.id}' replica {replica.replica_id} is unreachable; retry shortly",
                       headers={"retry-after": "1"}) from error
    except (EngineTransportError, OSError) as error:
        raise ApiError(502, f"engine replica {replica.replica_id} failed before answering: "
                       f"{type(error).__name__}") from error


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Outcome(enum.Enum):
    done = "done"
    disconnected = "disconnected"  # the client went away
    interrupted = "interrupted"  # the worker ended the request (replica restart, shutdown)
    timed_out = "timed_out"


async def race(work: asyncio.Future[Any], *, receive: Receive | None = None,
               interrupted: asyncio.Event | None = None, timeout_s: float | None = None) -> Outcome:
    """Wait for `work` unless the client disconnects or the request is interrupted first.

    Then `work` is cancelled; after `timeout_s` it is left running. The caller reads `work.result()`.
    """
    if interrupted is not None and interrupted.is_set():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Outcome.interrupted
    disconnect = asyncio.ensure_future(wait_for_disconnect(receive)) if receive is not None else None
    interruption = asyncio.ensure_future(interrupted.wait()) if interrupted is not None else None
    watchers = {task for task in (disconnect, interruption) if task is not None}
    try:
        done, _ = await asyncio.wait({work, *watchers}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        for task in watchers:
            task.cancel()
    if work in done:
        return Outcome.done
    if not done:
        return Outcome.timed_out
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return Outcome.disconnected if disconnect in done else Outcome.interrupted


def router_error_chunk(ctx: RequestContext, code: str, message: str) -> bytes:
    """The mid-stream failure chunk routers understand: HTTP status stays 200, finish_reason is "error"."""
    if ctx.endpoint == "chat.completions":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": "", "finish_reason": "error"}
        obj = "text_completion"
    chunk = {
        "id": f"err-{ctx.request_id}", "object": obj, "created": int(ctx.received_at), "model": ctx.model.id,
        "error": {"code": code, "message": message, "metadata": {"error_type": code}},
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class SseRelay:
    """Turns the engine's SSE byte stream into the client's, noting usage and finish reason on the way."""

    def __init__(self, ctx: RequestContext, finalizer: HookChain) -> None:
        self.ctx = ctx
        self.finalizer = finalizer
        self.saw_done = False

    def _usage_event(self, event: bytes) -> bytes | None:
        try:
            chunk = orjson.loads(event[len(b"data: "):])
        except orjson.JSONDecodeError:
            return event
        usage = chunk.get("usage")
        changed = False
        if isinstance(usage, dict):
            changed = take_engine_gpu_seconds(self.ctx, usage)
            self.ctx.usage = Usage.from_openai(usage)
            self.ctx.usage_estimated = False
        if not chunk.get("choices"):
            if not self.ctx.client_wants_usage:
                return None
            if isinstance(usage, dict):
                changed = add_usage_extras(self.finalizer, usage) or changed
        # else: continuous usage stats on a content chunk, which the client asked for
        return b"data: " + orjson.dumps(chunk) + b"\n\n" if changed else event

    def _engine_error_event(self, event: bytes) -> bytes:
        try:
            error = orjson.loads(event[len(b"data: "):]).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        message = str(error.get("message") or "the engine failed while generating")
        self.ctx.outcome = "engine_error"
        self.ctx.finish_reason = "error"
        self.ctx.error_message = message
        return router_error_chunk(self.ctx, "engine_error", message)

    def process(self, block: bytes) -> bytes:
        """What the client should receive for one complete block of SSE events, up to `[DONE]`.

        `saw_done` tells the caller that the block held `[DONE]`: it finalizes, then sends `SSE_DONE`.
        """
        self.ctx.streamed_events += block.count(b"data: ")
        if b'"finish_reason":"' in block:
            match = _FINISH_REASON.search(block)
            if match:
                self.ctx.finish_reason = match.group(1).decode()
        if b'"usage":{' not in block and b"data: [DONE]" not in block and b'data: {"error"' not in block:
            return block
        out: list[bytes] = []
        for event in block.split(b"\n\n"):
            if not event:
                continue
            event += b"\n\n"
            if event.startswith(b"data: [DONE]"):
                self.saw_done = True
                break
            if event.startswith(b'data: {"error"'):
                out.append(self._engine_error_event(event))
            elif b'"usage":{' in event:
                kept = self._usage_event(event)
                if kept is not None:
                    out.append(kept)
            else:
                out.append(event)
        return b"".join(out)

    def estimate_usage_if_missing(self) -> None:
        """The stream ended before the engine's usage chunk: count what was generated from its events.

        The prompt's count is left to `complete_usage` (a tokenizer call, only where it will be charged).
        """
        if self.ctx.usage is None and self.ctx.streamed_events:
            n = self.ctx.body.get("n", 1)
            # One engine event per generated token per choice, less the role-only opening event.
            self.ctx.usage = Usage(completion_tokens=max(0, self.ctx.streamed_events - n),
                                   prompt_source="none", completion_source="stream")
            self.ctx.usage_estimated = True


class RelayStreamResponse(Response):
    """A streaming response: headers at once, keep-alives until the engine's first byte, then its bytes.

    `opening` is the engine request, possibly still waiting for the engine's headers. The engine
    request is closed (so the engine aborts it) the moment the client goes away, and a stream the
    engine or the worker ends early closes with the router's error chunk and `[DONE]`.
    """

    def __init__(self, opening: asyncio.Future[EngineResponse], ctx: RequestContext, finalizer: HookChain,
                 headers: dict[str, str], lease: Lease, keepalive_s: float) -> None:
        super().__init__(status_code=200, media_type="text/event-stream", headers={**_STREAM_HEADERS, **headers})
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"content-length"]
        self.opening = opening
        self.ctx = ctx
        self.finalizer = finalizer
        self.lease = lease
        self.keepalive_s = keepalive_s
        self.error_code = "engine_unavailable"
        self.ended = False  # the response's last byte has been sent

    async def _keepalive_while(self, work: Any, send: Send) -> Any:
        """Await `work`, sending an SSE comment every `keepalive_s` meanwhile so routers do not time out."""
        if isinstance(work, asyncio.Future) and work.done():
            return work.result()
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.keepalive_s)
                if done:
                    return task.result()
                await send({"type": "http.response.body", "body": SSE_KEEPALIVE, "more_body": True})
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _pump(self, send: Send, relay: SseRelay) -> None:
        ctx = self.ctx
        try:
            upstream: EngineResponse = await self._keepalive_while(self.opening, send)
        except ApiError as error:  # the engine could not be reached, after the client got its headers
            ctx.outcome = "upstream_failed"
            ctx.error_message = error.message
            return
        if upstream.status != 200:
            await self._engine_refused(upstream)
            return
        content = upstream.content
        pending = b""
        try:
            # Whatever the socket holds is relayed in one piece: under load, one read carries many events.
            # The first events often came with the headers: take them without a wait (and its task).
            raw = content.read_nowait() or await self._keepalive_while(content.readany(), send)
            ctx.first_byte_monotonic = time.monotonic()
            if ctx.gpu_timer is not None:
                ctx.gpu_timer.first_byte(ctx.first_byte_monotonic)
            while raw:
                if pending:
                    raw = pending + raw
                end = raw.rfind(b"\n\n") + 2
                if end > 1:
                    block, pending = (raw, b"") if end == len(raw) else (raw[:end], raw[end:])
                    piece = relay.process(block)
                    if piece:
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if relay.saw_done:
                        await self._send_done(send)
                        await finish(upstream)
                        return
                else:
                    pending = raw
                raw = await content.readany()
        except EngineTransportError as error:
            ctx.error_message = f"engine connection failed mid-stream: {type(error).__name__}"

    async def _engine_refused(self, upstream: EngineResponse) -> None:
        """The engine answered with an error status after the client already got 200 (a slow engine)."""
        payload = await upstream.read()
        error = orjson.loads(normalise_engine_error(upstream.status, payload))["error"]
        self.ctx.outcome = "invalid_request" if upstream.status < 500 else "engine_error"
        self.ctx.error_message = error["message"]
        self.error_code = error["code"] or self.error_code

    async def _end_broken(self, send: Send, relay: SseRelay) -> None:
        """Tell the router plainly that the stream failed, instead of just cutting it."""
        ctx = self.ctx
        if ctx.outcome == "ok":
            ctx.outcome = "upstream_failed"
        ctx.finish_reason = "error"
        relay.estimate_usage_if_missing()
        message = ctx.error_message or "the engine stopped before finishing the response"
        await send({"type": "http.response.body", "more_body": True,
                    "body": router_error_chunk(ctx, self.error_code, message)})
        await self._send_done(send)

    async def _send_done(self, send: Send) -> None:
        await self.finalizer()
        # `[DONE]` is the last byte: one write ends the event stream and the response.
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
        self.ended = True

    async def _close_upstream(self) -> None:
        opening = self.opening
        if not opening.done():
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        elif not opening.cancelled() and opening.exception() is None:
            abort(opening.result())  # a no-op for an answer already read to its end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        ctx.status_code = 200
        relay = SseRelay(ctx, self.finalizer)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send, relay))
            outcome = await race(pump, receive=receive, interrupted=self.lease.interrupted)
            if outcome is Outcome.done:
                try:
                    pump.result()
                except OSError:
                    raise
                except Exception:  # the worker's own fault mid-stream: still end the stream the router's way
                    logger.exception("relay failed mid-stream", extra={"request_id": ctx.request_id})
                    ctx.outcome = "worker_error"
                    ctx.error_message = "internal error in the worker gateway"
                    self.error_code = "internal_error"
            if outcome is Outcome.disconnected:
                ctx.outcome = "client_disconnected"
            else:
                if outcome is Outcome.interrupted:
                    ctx.error_message = self.lease.interruption_reason or "the worker ended the request"
                if relay.saw_done and not self.ended and ctx.outcome != "worker_error":
                    await self._send_done(send)
                elif not self.ended:
                    await self._end_broken(send, relay)
        except OSError:  # the client vanished while we were writing
            ctx.outcome = "client_disconnected"
        finally:
            await self._close_upstream()
            if not self.finalizer.done:
                relay.estimate_usage_if_missing()
                await self.finalizer()
            self.lease.release()
