"""GPU time per request through the worker, against the mock engine's exact accounting: per request and in
sum (conservation), streamed or not, with n=2 and shared prefixes, in the worker process and through a
relay process; the client's usage never shows the engine's figure."""

from __future__ import annotations

import asyncio
import socket
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from tests.gateway.test_gateway_process_units import FirstFreeAdmission, RecordingHook, StandInReplica
from tests.support.worker_process import eventually, serving
from worker.billing.disclosure import usage_cost
from worker.capacity.gpu_time import GpuTimeMeters, GpuTimeShare
from worker.capacity.leasing import AdmissionLeaser
from worker.config import NodeConfig
from worker.engines.mock import build_mock_app
from worker.gateway.app import serve_inference
from worker.gateway.gateway import Gateway
from worker.gateway.processes.coordinator import GatewayProcesses, GatewaySockets
from worker.gateway.processes.relay_process import WorkerLink, relay_gateway

MODEL = "acme/chat"
GPUS = 2
LONG = "word " * 300


def _config() -> NodeConfig:
    return NodeConfig.model_validate({
        "worker": {"id": "w", "gateway_processes": 2},
        "models": [{"id": MODEL, "engine": "mock", "source": "local/x", "gpus_per_replica": GPUS,
                    "engine_args": {"max_model_len": 1024, "max_num_batched_tokens": 256},
                    "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "2"},
                    "mock": {"step_base_ms": 2.0, "step_per_seq_ms": 0.3, "prefill_per_token_ms": 0.02}}],
    })


Post = Callable[[str, dict[str, Any], str], Awaitable[tuple[int, dict[str, str], bytes]]]


def _poster(gateway: Gateway) -> Post:
    async def post(path: str, payload: dict[str, Any], request_id: str) -> tuple[int, dict[str, str], bytes]:
        endpoint = "chat.completions" if path.endswith("chat/completions") else "completions"
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]}
        sent = [{"type": "http.request", "body": orjson.dumps(payload), "more_body": False}]
        messages: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if sent:
                return sent.pop()
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        await serve_inference(gateway, endpoint, scope, receive, send)
        headers = {name.decode(): value.decode() for name, value in messages[0]["headers"]}
        return int(messages[0]["status"]), headers, b"".join(m.get("body", b"") for m in messages[1:])

    return post


@asynccontextmanager
async def worker(relayed: bool, meters: GpuTimeMeters) -> AsyncIterator[tuple[Post, RecordingHook, str]]:
    """A worker (its own gateway, or a relay's in front of the worker process's) on one mock replica."""
    config = _config()
    hook = RecordingHook()
    async with serving(build_mock_app(config.models[0])) as engine_url:
        replica = StandInReplica("chat-0", engine_url)
        gateway = Gateway(config, AdmissionLeaser(FirstFreeAdmission([replica]), meters),  # type: ignore[arg-type]
                          hooks=[hook])
        try:
            if relayed:
                async with _relaying(config, gateway) as relay:
                    yield _poster(relay), hook, engine_url
            else:
                yield _poster(gateway), hook, engine_url
        finally:
            await replica.data.aclose()


@asynccontextmanager
async def _relaying(config: NodeConfig, gateway: Gateway) -> AsyncIterator[Gateway]:
    """A relay process's gateway in front of `gateway`, as the worker process's coordinator runs it."""
    with socket.socket() as public, socket.socket() as internal:
        processes = GatewayProcesses(config, gateway, GatewaySockets(public, internal, "/nonexistent"),
                                     count=1, log_level="info")
        ours, theirs = socket.socketpair()
        await processes.connect(processes.relays[0], ours)
        link = WorkerLink()
        await link.connect(theirs)
        try:
            yield relay_gateway(config, link, usage_cost)
        finally:
            assert link.channel is not None
            await link.channel.aclose()
            await processes.stop()
            await link.aclose()


def _chat(content: str, **options: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **options}


# (path, body): long and short prompts, two sharing a 300-word prefix, n=2, streamed with and without usage.
MIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "long": ("/v1/chat/completions", _chat(LONG)),
    "long-shared-prefix": ("/v1/chat/completions", _chat(LONG + "and then a different ending")),
    "short-n2": ("/v1/completions", {"model": MODEL, "prompt": "a short prompt", "max_tokens": 20, "n": 2}),
    "stream-usage": ("/v1/chat/completions", _chat("tell me a story " * 20, max_tokens=30, stream=True,
                                                   stream_options={"include_usage": True})),
    "stream-plain": ("/v1/chat/completions", _chat("short", max_tokens=25, stream=True)),
    "stream-long": ("/v1/completions", {"model": MODEL, "prompt": LONG + "tail", "max_tokens": 8, "stream": True}),
}


def _client_usages(body: bytes, stream: bool) -> list[dict[str, Any]]:
    if not stream:
        return [orjson.loads(body)["usage"]]
    events = [line[len(b"data: "):] for line in body.split(b"\n\n") if line.startswith(b"data: {")]
    return [chunk["usage"] for chunk in map(orjson.loads, events) if chunk.get("usage")]


@pytest.mark.parametrize("relayed", [False, True], ids=["worker-process", "relay-process"])
async def test_mixed_load_matches_the_mocks_accounting_per_request_and_in_sum(relayed: bool) -> None:
    meters = GpuTimeMeters()
    async with worker(relayed, meters) as (post, hook, engine_url):
        answers = {}
        for round_index in range(2):  # the second round finds the long prompt's blocks cached
            names = [f"{name}-{round_index}" for name in MIXED]
            results = await asyncio.gather(*(post(MIXED[name.rsplit("-", 1)[0]][0],
                                                  MIXED[name.rsplit("-", 1)[0]][1], name) for name in names))
            answers.update(zip(names, results, strict=True))

        async def all_recorded() -> bool:
            return len(hook.finalized) == len(answers)

        assert await eventually(all_recorded, timeout_s=10)
        async with httpx.AsyncClient(base_url=engine_url) as client:
            accounting = (await client.get("/mock/accounting")).json()

    contexts = {ctx.request_id: ctx for ctx in hook.finalized}
    exact = {}
    for name, (status, headers, body) in answers.items():
        stream = bool(MIXED[name.rsplit("-", 1)[0]][1].get("stream"))
        assert status == 200, body
        ctx = contexts[name]
        assert ctx.outcome == "ok" and ctx.gpu_seconds_source == "engine"
        prefix = "chatcmpl-" if ctx.endpoint == "chat.completions" else "cmpl-"
        exact[name] = accounting["requests"][prefix + name] * GPUS
        assert ctx.gpu_seconds == pytest.approx(exact[name], rel=0.01)
        # The client's usage keeps its documented fields; the engine's figure is the worker's alone.
        usages = _client_usages(body, stream)
        assert all("gpu_seconds" not in usage for usage in usages)
        if stream and not name.startswith("stream-usage"):
            assert usages == []  # not asked for: the usage chunk is read, then dropped
        else:
            assert usages[-1]["completion_tokens"] > 0
        if stream:
            assert "x-worker-gpu-seconds" not in headers  # not known when a stream's headers leave
        else:
            assert float(headers["x-worker-gpu-seconds"]) == pytest.approx(ctx.gpu_seconds, abs=1e-6)
    # Conservation: every step of the engine went to one of these requests, GPUs per replica times over.
    assert sum(ctx.gpu_seconds or 0.0 for ctx in hook.finalized) == pytest.approx(
        accounting["busy_seconds"] * GPUS, rel=0.01)
    # The estimate was metered all the same, and conserves the replica's busy time as the worker saw it.
    estimates = {}
    for ctx in hook.finalized:
        assert isinstance(ctx.gpu_timer, GpuTimeShare)
        estimates[ctx.request_id] = ctx.gpu_timer.seconds * GPUS
    assert sum(estimates.values()) == pytest.approx(meters.meter("chat-0").busy_seconds() * GPUS, rel=1e-9)
    errors = sorted(abs(estimates[name] / exact[name] - 1) for name in exact)
    print(f"estimate vs exact, {'relayed' if relayed else 'in process'}: median relative error "
          f"{statistics.median(errors):.1%}, worst {errors[-1]:.1%}; estimated busy "
          f"{meters.meter('chat-0').busy_seconds():.4f} s, engine busy {accounting['busy_seconds']:.4f} s")
