"""One relay process (see coordinator.py): serves the worker's port, relays inference bytes, asks the
worker process for every decision, and passes every other request on to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from worker.config import NodeConfig
from worker.engines.data_client import EngineDataClient
from worker.gateway.app import inference_endpoint, serve_inference
from worker.gateway.client_address import with_relayed_client
from worker.gateway.context import RequestContext, RequestView
from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.http_limits import LimitedConfig
from worker.gateway.leasing import EngineTarget
from worker.gateway.processes.messages import (
    Abandon,
    Admitted,
    Begin,
    Finish,
    Finished,
    FirstByte,
    Hello,
    Interrupt,
    Readmit,
    Refused,
    Release,
    ToRelay,
)
from worker.gateway.relay import Outcome, race
from worker.logs import configure_logging
from worker.processes.rpc import Channel, ChannelClosed
from worker.refusals import ClientDisconnected

logger = logging.getLogger("worker.gateway.relay_process")

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business on each side.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"host", b"content-length"})


class RemoteReplica:
    """A replica as a relay sees it (an EngineTarget): where to send the bytes; the worker process keeps
    its state."""

    __slots__ = ("data", "model_id", "replica_id")

    def __init__(self, replica_id: str, model_id: str, base_url: str) -> None:
        self.replica_id = replica_id
        self.model_id = model_id
        self.data = EngineDataClient(base_url)


class RemoteLease:
    """The worker process's lease, seen from the relay (a Lease): ended there when the request finishes."""

    __slots__ = ("_link", "_released", "extras", "interrupted", "interruption_reason", "record", "replica")

    def __init__(self, link: WorkerLink, record: str, replica: RemoteReplica, extras: dict[str, Any]) -> None:
        self._link = link
        self.record = record
        self.replica = replica
        self.extras = extras
        self.interrupted = asyncio.Event()
        self.interruption_reason = ""
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._link.released(self)


class RemoteGpuTimer:
    """A request's GPU-time share, seen from the relay (a GpuTimer): the worker process meters it; the relay
    tells it when a stream's first byte came, and learns the figure when the request is recorded."""

    __slots__ = ("_link", "_record", "_sent")

    def __init__(self, link: WorkerLink, record: str) -> None:
        self._link = link
        self._record = record
        self._sent = False

    def first_byte(self, at: float) -> None:
        channel = self._link.channel
        if not self._sent and channel is not None:
            self._sent = True
            with contextlib.suppress(ChannelClosed):
                channel.tell(FirstByte(record=self._record, at=at))

    def settle(self, at: float) -> float | None:
        return None


class WorkerLink:
    """The relay's channel to the worker process, and the leases it holds through it: the relay's Leaser."""

    def __init__(self) -> None:
        self.channel: Channel[ToRelay] | None = None
        self.hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self.targets: dict[tuple[str, str], RemoteReplica] = {}
        self.leases: dict[str, RemoteLease] = {}

    async def connect(self, sock: socket.socket) -> Hello:
        """Talk to the worker process over `sock`; what it says first."""
        self.channel = await Channel.over(sock, ToRelay, self.on_message)
        return await self.hello

    def on_message(self, message: ToRelay, call_id: int) -> None:
        if isinstance(message, Interrupt):
            lease = self.leases.get(message.record)
            if lease is not None:
                lease.interruption_reason = message.reason
                lease.interrupted.set()
        elif isinstance(message, Hello) and not self.hello.done():
            self.hello.set_result(message)

    async def _call(self, message: Begin | Readmit | Finish) -> ToRelay:
        if self.channel is None:
            raise ChannelClosed("not connected")
        try:
            return await self.channel.call(message)
        except ChannelClosed:
            raise ApiError(503, "this worker is restarting; retry shortly", headers={"retry-after": "1"}) from None

    async def begin(self, ctx: RequestContext, request: RequestView) -> None:
        self._admitted(ctx, await self._call(Begin.of(ctx, request.path, request.headers.raw)))

    async def readmit(self, ctx: RequestContext) -> RemoteLease:
        self._admitted(ctx, await self._call(Readmit(record=ctx.record_id)))
        return self.leases[ctx.record_id]

    def _admitted(self, ctx: RequestContext, answer: ToRelay) -> None:
        if isinstance(answer, Refused):
            raise answer.error()
        if not isinstance(answer, Admitted):
            raise TypeError(f"the worker process answered a request with {type(answer).__name__}")
        ctx.response_headers.update(answer.headers)
        key = (answer.replica, answer.url)
        target = self.targets.get(key)
        if target is None:
            target = self.targets[key] = RemoteReplica(answer.replica, ctx.model.id, answer.url)
        self.leases[ctx.record_id] = RemoteLease(self, ctx.record_id, target, answer.extras)
        if ctx.gpu_timer is None:
            ctx.gpu_timer = RemoteGpuTimer(self, ctx.record_id)

    def abandon(self, ctx: RequestContext) -> None:
        """The client left before the worker process answered `begin`: it ends the request there."""
        if self.channel is not None:
            with contextlib.suppress(ChannelClosed):
                self.channel.tell(Abandon(record=ctx.record_id))

    async def lease(self, ctx: RequestContext, *, exclude: EngineTarget | None = None,
                    receive: Receive | None = None) -> RemoteLease:
        """The lease the worker process granted when it admitted the request (RemoteHooks asked for it),
        or, once that replica failed it, a sibling's lease from the worker process."""
        if exclude is None:
            return self.leases[ctx.record_id]
        return await self.readmit(ctx)

    def released(self, lease: RemoteLease) -> None:
        if self.leases.get(lease.record) is lease and self.channel is not None:
            with contextlib.suppress(ChannelClosed):  # then the worker process releases it itself
                self.channel.tell(Release(record=lease.record))

    async def finish(self, ctx: RequestContext) -> None:
        self.leases.pop(ctx.record_id, None)
        answer = await self._call(Finish.of(ctx))
        if isinstance(answer, Finished) and ctx.gpu_seconds is None:
            ctx.gpu_seconds = answer.gpu_seconds

    async def aclose(self) -> None:
        for target in self.targets.values():
            await target.data.aclose()


# What a relay adds to a usage object itself (`usage.cost`): the other hooks' extras come from the worker.
UsageExtras: TypeAlias = Callable[[RequestContext], dict[str, Any]]


class RemoteHooks:
    """The relay's only request hook: every real hook runs in the worker process."""

    def __init__(self, link: WorkerLink, usage_extras: UsageExtras) -> None:
        self.link = link
        self._usage_extras = usage_extras

    async def before_request(self, ctx: RequestContext, request: RequestView) -> None:
        # The worker process may queue the request for a while: a client that leaves meanwhile must
        # leave the queue there too, so that it never reaches an engine.
        beginning = asyncio.ensure_future(self.link.begin(ctx, request))
        if await race(beginning, receive=request.receive) is Outcome.disconnected:
            self.link.abandon(ctx)
            raise ClientDisconnected("the client left while its request was queued")
        beginning.result()

    def after_route(self, ctx: RequestContext) -> None:
        return None  # the worker process ran them when it admitted the request; their headers came back

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]:
        lease = self.link.leases.get(ctx.record_id)
        return {**(lease.extras if lease is not None else {}), **self._usage_extras(ctx)}

    async def finalize(self, ctx: RequestContext) -> None:
        try:
            await self.link.finish(ctx)
        except ApiError:
            logger.error("the worker process went away before recording a request",
                         extra={"request_id": ctx.request_id, "record_id": ctx.record_id})


def relay_gateway(config: NodeConfig, link: WorkerLink, usage_extras: UsageExtras) -> Gateway:
    """The gateway a relay runs: the worker process leases its replicas and runs every hook."""
    return Gateway(config, link, hooks=[RemoteHooks(link, usage_extras)])


class RelayApp:
    """Inference requests are relayed here; every other request goes on to the worker process."""

    def __init__(self, gateway: Gateway, internal_path: str) -> None:
        self.gateway = gateway
        self.worker = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=internal_path),
                                        base_url="http://worker", timeout=httpx.Timeout(None, connect=5.0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = inference_endpoint(scope)
        if endpoint is not None:
            await serve_inference(self.gateway, endpoint, scope, receive, send)
        elif scope["type"] == "http":
            await self._pass_on(scope, receive, send)

    async def _pass_on(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = with_relayed_client(scope, [(n, v) for n, v in scope["headers"] if n not in _HOP_BY_HOP])
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        request = self.worker.build_request(scope["method"], target.decode("latin-1"), headers=headers,
                                            content=bytes(body))
        try:
            response = await self.worker.send(request, stream=True)
        except httpx.HTTPError:
            error = ApiError(503, "this worker is restarting; retry shortly", headers={"retry-after": "1"})
            await error.to_response()(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(n, v) for n, v in response.headers.raw if n.lower() not in _HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.worker.aclose()


class RelayServer(uvicorn.Server):
    """uvicorn, deaf to signals: the relay ends when the worker process closes its channel (after draining)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        return None


async def run(control_fd: int, public_fd: int, usage_extras: UsageExtras) -> None:
    """One relay process's life (worker/relay_entry.py starts it)."""
    link = WorkerLink()
    hello = await link.connect(socket.socket(fileno=control_fd))
    channel = link.channel
    assert channel is not None
    configure_logging(hello.log_level)
    config = NodeConfig.model_validate(hello.config)
    app = RelayApp(relay_gateway(config, link, usage_extras), hello.internal)
    server = RelayServer(LimitedConfig(app, limits=config.worker.http, lifespan="off", access_log=False,
                                       log_config=None, timeout_graceful_shutdown=5))
    serving = asyncio.ensure_future(server.serve(sockets=[socket.socket(fileno=public_fd)]))
    closed = asyncio.ensure_future(channel.closed.wait())
    logger.info("gateway process serving", extra={"gateway_process": hello.index})
    await asyncio.wait({serving, closed}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    started = time.monotonic()
    await serving
    await channel.aclose()
    await link.aclose()
    await app.aclose()
    logger.info("gateway process stopped", extra={"gateway_process": hello.index,
                                                  "shutdown_s": round(time.monotonic() - started, 3)})
