"""Several gateway processes: the worker process starts relay processes and decides for them.

One process relays roughly 50k tokens/s (the per-event work of the stream relay); a node with several
GPUs can generate more. With `worker.gateway_processes: N` above 1, N relay processes accept the
worker's port (one listening socket, shared) and relay inference bytes between clients and engines,
while every decision stays in the worker process, so that no state has to be shared: a relay asks it
to admit each request (auth, rate limits, balance reservation, admission, the replica's lease), and
tells it when the request ended (metering, ledger, metrics, access log, the lease's release). The
worker process tells a relay when one of its requests must end (replica restart, drain). Everything
else (health, /metrics, keys, admin) the relays pass to the worker process over a Unix socket.

A relay process that dies is started again; its unfinished requests are recorded as failed and their
leases released. Relays end when the worker process closes their channels (or dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from worker.config import NodeConfig
from worker.gateway.context import RequestContext, RequestView
from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.leasing import Lease
from worker.gateway.pipeline import HookChain
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
    ToWorker,
)
from worker.processes.python_child import start_python, wait_or_kill
from worker.processes.rpc import Channel, ChannelClosed
from worker.processes.supervisor import ChildSupervisor, Ended, RestartPolicy, RunEnd

logger = logging.getLogger(__name__)

_ENTRY = "from worker.relay_entry import main; main()"
_EXIT_TIMEOUT_S = 10.0


@dataclass
class GatewaySockets:
    """The worker's public listening socket (the relays accept on it) and the worker process's own."""

    public: socket.socket
    internal: socket.socket
    internal_path: str

    @classmethod
    def open(cls, host: str, port: int) -> GatewaySockets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        public = socket.create_server((host, port), family=family, backlog=2048)
        directory = tempfile.mkdtemp(prefix="worker-gateway-")
        path = os.path.join(directory, "worker.sock")
        internal = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        internal.bind(path)
        internal.listen(2048)
        os.chmod(path, 0o600)
        return cls(public=public, internal=internal, internal_path=path)

    def close(self) -> None:
        self.public.close()
        self.internal.close()
        shutil.rmtree(Path(self.internal_path).parent, ignore_errors=True)


@dataclass
class _Relay:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel[ToWorker] | None = None
    records: set[str] = field(default_factory=set)
    requests: int = 0
    restarts: int = 0


@dataclass
class _Relayed:
    """A request a relay process serves: the worker process's own context, hooks and lease for it."""

    ctx: RequestContext
    chain: HookChain
    lease: Lease
    relay: _Relay


def _cpu_seconds(process: asyncio.subprocess.Process | None) -> float | None:
    """CPU time the relay process has used (a read of /proc: microseconds)."""
    if process is None or process.returncode is not None:
        return None
    try:
        times = psutil.Process(process.pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class GatewayProcesses:
    def __init__(self, config: NodeConfig, gateway: Gateway, sockets: GatewaySockets, *, count: int,
                 log_level: str) -> None:
        self.config = config
        self.gateway = gateway
        self.sockets = sockets
        self.log_level = log_level
        self.relays = [_Relay(index) for index in range(count)]
        policy = RestartPolicy.of(config.worker)
        self._supervisors = [ChildSupervisor(f"gateway-process-{relay.index}", partial(self._run_once, relay), policy)
                             for relay in self.relays]
        self._records: dict[str, _Relayed] = {}
        # Requests being admitted (possibly queued): a relay whose client leaves cancels its admission.
        self._beginning: dict[str, asyncio.Future[None]] = {}
        # Each replica's current interruption event -> the relayed records leased under it.
        self._interruptions: dict[asyncio.Event, set[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # Lifecycle.
    async def start(self) -> None:
        for relay in self.relays:
            await self._spawn(relay)
        for supervisor in self._supervisors:
            supervisor.start()

    async def stop(self) -> None:
        """Close every relay's channel (it stops accepting and exits), then wait for the processes."""
        self._stopping = True
        for supervisor in self._supervisors:
            supervisor.stopping = True
        for relay in self.relays:
            if relay.channel is not None:
                await relay.channel.aclose()
        for relay in self.relays:
            if relay.process is not None:
                await wait_or_kill(relay.process, _EXIT_TIMEOUT_S, "gateway process")
        await asyncio.gather(*(supervisor.stop() for supervisor in self._supervisors))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for relay in self.relays:
            self._relay_gone(relay)

    def describe(self) -> list[dict[str, Any]]:
        return [{"process": relay.index, "pid": relay.process.pid if relay.process else None,
                 "up": relay.channel is not None and not relay.channel.closed.is_set(),
                 "requests": relay.requests, "restarts": relay.restarts, "in_flight": len(relay.records),
                 "cpu_seconds": _cpu_seconds(relay.process)}
                for relay in self.relays]

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, relay: _Relay) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        public_fd = self.sockets.public.fileno()
        try:
            relay.process = await start_python(_ENTRY, str(theirs.fileno()), str(public_fd),
                                               pass_fds=(theirs.fileno(), public_fd))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        await self.connect(relay, ours)
        logger.info("gateway process started", extra={"gateway_process": relay.index, "pid": relay.process.pid})

    async def connect(self, relay: _Relay, sock: socket.socket) -> None:
        """Serve the relay process at the other end of `sock` from now on."""
        channel: Channel[ToWorker] = await Channel.over(sock, ToWorker, partial(self._on_message, relay))
        relay.channel = channel
        channel.tell(Hello(index=relay.index, config=self.config.model_dump(mode="json"),
                           internal=self.sockets.internal_path, log_level=self.log_level))
        self._background(self._when_closed(relay, channel))

    async def _when_closed(self, relay: _Relay, channel: Channel[ToWorker]) -> None:
        await channel.closed.wait()
        if relay.channel is channel:
            relay.channel = None
        self._relay_gone(relay)

    async def _run_once(self, relay: _Relay) -> Ended:
        """Serve the relay process until it exits (started here again after the first)."""
        process = relay.process
        if process is None or process.returncode is not None:
            try:
                await self._spawn(relay)
            except Exception:
                logger.exception("cannot start a gateway process", extra={"gateway_process": relay.index})
                return Ended(RunEnd.refused)
            process = relay.process
            assert process is not None
        code = await process.wait()
        if self._stopping:
            return Ended(RunEnd.exited)
        if relay.channel is not None:
            await relay.channel.aclose()
        relay.restarts += 1
        return Ended(RunEnd.exited, partial(self._exited, relay, process.pid, code))

    @staticmethod
    def _exited(relay: _Relay, pid: int, code: int, delay_s: float) -> None:
        logger.error("gateway process exited; starting it again", extra={
            "gateway_process": relay.index, "pid": pid, "exit_code": code, "backoff_s": delay_s})

    def _relay_gone(self, relay: _Relay) -> None:
        """The relay's clients lost their connections with it: record their requests as failed."""
        for record in list(relay.records):
            relayed = self._records.pop(record, None)
            if relayed is None:
                continue
            ctx = relayed.ctx
            if ctx.outcome == "ok":
                ctx.outcome = "upstream_failed"
                ctx.status_code = ctx.status_code or 502
                ctx.error_message = "the gateway process relaying the request exited"
            self._end(relayed)
        relay.records.clear()

    def _end(self, relayed: _Relayed, finished_monotonic: float | None = None) -> asyncio.Future[None]:
        relayed.relay.records.discard(relayed.ctx.record_id)
        self._unwatch(relayed)
        finishing = self.gateway.finalize_soon(relayed.chain, finished_monotonic)
        relayed.lease.release()
        return finishing

    # Messages from relays.
    def _on_message(self, relay: _Relay, message: ToWorker, call_id: int) -> None:
        if isinstance(message, Begin):
            relay.requests += 1
            record = message.record
            beginning = asyncio.ensure_future(self._begin(relay, message, call_id))
            self._beginning[record] = beginning
            beginning.add_done_callback(lambda _: self._beginning.pop(record, None))
            self._background(beginning)
        elif isinstance(message, Finish):
            self._background(self._finish(relay, message, call_id))
        elif isinstance(message, Readmit):
            self._background(self._readmit(relay, message, call_id))
        elif isinstance(message, Abandon):
            self._abandon(message.record)
        elif isinstance(message, FirstByte):
            relayed = self._records.get(message.record)
            if relayed is not None and relayed.ctx.gpu_timer is not None:
                relayed.ctx.gpu_timer.first_byte(message.at)
        elif isinstance(message, Release):
            relayed = self._records.get(message.record)
            if relayed is not None:
                self._unwatch(relayed)
                relayed.lease.release()

    def _abandon(self, record: str) -> None:
        """The relay's client left while the request was being admitted (typically queued)."""
        beginning = self._beginning.get(record)
        if beginning is not None:
            beginning.cancel()
            return
        relayed = self._records.pop(record, None)
        if relayed is not None:  # admitted just before the client left: its slot goes back
            relayed.ctx.outcome, relayed.ctx.status_code = "client_disconnected", 499
            self._end(relayed)

    async def _begin(self, relay: _Relay, message: Begin, call_id: int) -> None:
        channel = relay.channel
        if channel is None:
            return
        model = self.config.model(message.model)
        if model is None:  # the relay checked it against the same configuration
            channel.reply(call_id, Refused.of(ApiError(404, f"The model '{message.model}' does not exist")))
            return
        ctx = message.context(model, relay.index)
        chain = self.gateway.hook_chain(ctx)
        relayed: _Relayed | None = None
        try:
            lease = await self.gateway.check_in(ctx, RequestView.of(message.scope()), chain)
            relayed = _Relayed(ctx, chain, lease, relay)
            if relay.channel is not channel:  # the relay died meanwhile
                ctx.outcome = "upstream_failed"
                ctx.error_message = "the gateway process relaying the request exited"
                self._end(relayed)
                return
            self._records[ctx.record_id] = relayed
            relay.records.add(ctx.record_id)
            self._watch(relayed)
            answer = self._admitted(relayed)
        except ApiError as error:
            await self.gateway.answered_with(error, ctx, chain)
            channel.reply(call_id, Refused.of(error))
            return
        except asyncio.CancelledError:  # abandoned by the relay's client (or the worker is stopping)
            ctx.outcome, ctx.status_code = "client_disconnected", 499
            if relayed is not None:
                self._records.pop(ctx.record_id, None)
                self._end(relayed)
            else:
                self.gateway.finalize_soon(chain)
            raise
        except Exception as error:  # the worker's own fault: recorded, and everything it held given back
            logger.exception("cannot admit a relayed request", extra={"request_id": ctx.request_id})
            ctx.outcome, ctx.status_code = "worker_error", 500
            ctx.error_message = f"internal error in the worker gateway: {type(error).__name__}"
            if relayed is not None:
                self._records.pop(ctx.record_id, None)
                self._end(relayed)
            else:
                self.gateway.finalize_soon(chain)
            channel.reply(call_id, Refused.of(ApiError(500, "internal error in the worker gateway")))
            return
        channel.reply(call_id, answer)

    def _admitted(self, relayed: _Relayed) -> Admitted:
        ctx, replica = relayed.ctx, relayed.lease.replica
        ctx.replica = replica
        relayed.chain.routed()
        # What the hooks add to `usage` beside its cost, which the relay prices itself as the usage comes.
        extras = relayed.chain.usage_extras()
        return Admitted(replica=replica.replica_id, url=replica.data.base_url, headers=ctx.response_headers,
                        extras=extras)

    async def _readmit(self, relay: _Relay, message: Readmit, call_id: int) -> None:
        """The replica failed before answering: the request goes to a sibling, or is refused (still open)."""
        relayed = self._records.get(message.record)
        channel = relay.channel
        if relayed is None or channel is None:
            return
        self._unwatch(relayed)
        previous = relayed.lease
        previous.release()
        try:
            relayed.lease = await self.gateway.admit(relayed.ctx, exclude=previous.replica)
        except ApiError as refusal:
            channel.reply(call_id, Refused.of(refusal))
            return
        self._watch(relayed)
        channel.reply(call_id, self._admitted(relayed))

    async def _finish(self, relay: _Relay, message: Finish, call_id: int) -> None:
        relayed = self._records.pop(message.record, None)
        gpu_seconds = None
        if relayed is not None:
            message.apply_to(relayed.ctx)
            # Shielded, like the relay's own finalize: the ledger write is never cut short. Its GPU time is
            # settled as the finalize starts.
            finishing = self._end(relayed, message.finished)
            gpu_seconds = relayed.ctx.gpu_seconds
            await asyncio.shield(finishing)
        if relay.channel is not None:
            relay.channel.reply(call_id, Finished(gpu_seconds=gpu_seconds))

    # Interruptions: a replica's restart ends the requests leased on it, in whichever process they run.
    def _watch(self, relayed: _Relayed) -> None:
        event = relayed.lease.interrupted
        holders = self._interruptions.get(event)
        if holders is None:
            holders = self._interruptions[event] = set()
            self._background(self._forward_interruption(event))
        holders.add(relayed.ctx.record_id)

    def _unwatch(self, relayed: _Relayed) -> None:
        holders = self._interruptions.get(relayed.lease.interrupted)
        if holders is not None:
            holders.discard(relayed.ctx.record_id)

    async def _forward_interruption(self, event: asyncio.Event) -> None:
        try:
            await event.wait()
        finally:
            records = self._interruptions.pop(event, set())
        for record in records:
            relayed = self._records.get(record)
            channel = relayed.relay.channel if relayed is not None else None
            if relayed is None or channel is None:
                continue
            with contextlib.suppress(ChannelClosed):
                channel.tell(Interrupt(record=record, reason=relayed.lease.interruption_reason))
