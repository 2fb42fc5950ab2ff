"""The worker process's side and a relay's side of several gateway processes, joined in one process.

The relay's gateway and the worker process's coordinator talk over a real socket pair, as between
processes; the replicas are stand-ins in front of a small in-process engine, so the tests can decide
which replica is reachable.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.worker_process import eventually, free_port, serving
from worker.billing.disclosure import usage_cost
from worker.capacity.leasing import AdmissionLeaser
from worker.config import NodeConfig
from worker.engines.data_client import EngineDataClient
from worker.engines.replica import ReplicaLease, _Interruption
from worker.gateway.app import serve_inference
from worker.gateway.context import RequestContext
from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.processes.coordinator import GatewayProcesses, GatewaySockets
from worker.gateway.processes.relay_process import WorkerLink, relay_gateway

MODEL = "acme/chat"


async def _chat_completion(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"id": "c1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}})


ENGINE = Starlette(routes=[Route("/v1/chat/completions", _chat_completion, methods=["POST"])])


class StandInReplica:
    """What the coordinator reads of a replica: its id, its engine's URL (its data client's) and its in-flight
    count."""

    def __init__(self, replica_id: str, base_url: str) -> None:
        self.replica_id = replica_id
        self.data = EngineDataClient(base_url)
        self.in_flight = 0
        self.on_free = None
        self.interruption = _Interruption()

    def lease(self) -> ReplicaLease:
        self.in_flight += 1
        return ReplicaLease(self, self.interruption)  # type: ignore[arg-type]


class FirstFreeAdmission:
    def __init__(self, replicas: list[StandInReplica]) -> None:
        self.replicas = replicas
        self.excluded: list[str] = []

    def admit_now(self, ctx: RequestContext, exclude: StandInReplica | None = None) -> ReplicaLease:
        if exclude is not None:
            self.excluded.append(exclude.replica_id)
        for replica in self.replicas:
            if replica is not exclude:
                return replica.lease()
        raise ApiError(503, "no replica is ready", headers={"retry-after": "5"})

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        raise AssertionError("a replica always has room here: nothing queues")


class RecordingHook:
    def __init__(self) -> None:
        self.finalized: list[RequestContext] = []

    async def before_request(self, ctx: RequestContext, request: Request) -> None:
        ctx.response_headers["x-seen-by"] = "worker-process"

    def after_route(self, ctx: RequestContext) -> None:
        ctx.response_headers["x-routed-to"] = ctx.replica.replica_id if ctx.replica else ""

    def usage_extras(self, ctx: RequestContext) -> dict[str, object]:
        return {"is_byok": True}

    async def finalize(self, ctx: RequestContext) -> None:
        self.finalized.append(ctx)


def _config() -> NodeConfig:
    return NodeConfig.model_validate({
        "worker": {"id": "w", "gateway_processes": 2},
        "models": [{"id": MODEL, "engine": "mock", "source": "local/x",
                    "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "2"}}],
    })


@asynccontextmanager
async def joined(replicas: list[StandInReplica], hook: RecordingHook) -> AsyncIterator[Gateway]:
    """A coordinator in front of `replicas` and a relay gateway connected to it."""
    config = _config()
    gateway = Gateway(config, AdmissionLeaser(FirstFreeAdmission(replicas)), hooks=[hook])  # type: ignore[arg-type]
    with socket.socket() as public, socket.socket() as internal:
        processes = GatewayProcesses(config, gateway, GatewaySockets(public, internal, "/nonexistent"), count=1,
                                     log_level="info")
        ours, theirs = socket.socketpair()
        await processes.connect(processes.relays[0], ours)
        link = WorkerLink()
        await link.connect(theirs)
        relay = relay_gateway(config, link, usage_cost)
        try:
            yield relay
        finally:
            await link.channel.aclose()
            await processes.stop()
            await link.aclose()


async def _post(relay: Gateway, payload: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps(payload)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    messages: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        if sent:
            return sent.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    await serve_inference(relay, "chat.completions", scope, receive, send)
    start = messages[0]
    headers = {name.decode(): value.decode() for name, value in start["headers"]}  # type: ignore[union-attr]
    return int(start["status"]), headers, b"".join(m.get("body", b"") for m in messages[1:])  # type: ignore[misc]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_a_request_its_replica_cannot_take_goes_to_a_sibling_and_every_lease_is_released() -> None:
    hook = RecordingHook()
    async with serving(ENGINE) as live_url:
        unreachable = StandInReplica("chat-0", f"http://127.0.0.1:{free_port()}")
        live = StandInReplica("chat-1", live_url)
        async with joined([unreachable, live], hook) as relay:
            status, headers, body = await _post(relay, CHAT)

            async def finalized() -> bool:
                return bool(hook.finalized)

            assert await eventually(finalized, timeout_s=10)  # the worker process recorded how it ended
    assert status == 200, body
    answer = orjson.loads(body)
    assert answer["usage"]["is_byok"] is True  # from the worker process's hooks
    assert answer["usage"]["cost"] == (4 * 1 + 1 * 2) / 1_000_000  # priced by the relay as the usage came
    assert headers["x-worker-replica"] == "chat-1"
    assert headers["x-seen-by"] == "worker-process" and headers["x-routed-to"] == "chat-1"
    assert unreachable.in_flight == 0 and live.in_flight == 0
    [ctx] = hook.finalized
    assert ctx.replica is live and ctx.outcome == "ok" and ctx.status_code == 200
    assert ctx.usage is not None and ctx.usage.completion_tokens == 1
    assert ctx.gateway_process == 0
    # The relay's timings, on the clock every process on the host shares.
    assert ctx.admitted_monotonic is not None and ctx.first_byte_monotonic is not None
    assert ctx.started_monotonic < ctx.admitted_monotonic < ctx.first_byte_monotonic < ctx.finished_monotonic


async def test_a_request_no_replica_can_take_is_refused_and_recorded_once() -> None:
    hook = RecordingHook()
    replicas = [StandInReplica(f"chat-{i}", f"http://127.0.0.1:{free_port()}") for i in range(2)]
    async with joined(replicas, hook) as relay:
        status, headers, body = await _post(relay, CHAT)
    assert status == 503
    assert orjson.loads(body)["error"]["message"].endswith("is unreachable; retry shortly")
    assert headers["retry-after"] == "1"
    assert [r.in_flight for r in replicas] == [0, 0]
    [ctx] = hook.finalized
    assert ctx.outcome == "rejected" and ctx.status_code == 503


async def test_a_refusal_from_the_worker_process_reaches_the_client_with_its_headers() -> None:
    hook = RecordingHook()
    async with joined([], hook) as relay:
        status, headers, body = await _post(relay, CHAT)
    assert status == 503
    assert orjson.loads(body)["error"] == {"message": "no replica is ready", "type": "service_unavailable",
                                           "param": None, "code": "provider_overloaded"}
    assert headers["retry-after"] == "5" and headers["x-seen-by"] == "worker-process"
    [ctx] = hook.finalized
    assert ctx.outcome == "rejected"
