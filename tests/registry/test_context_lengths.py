"""The listing's context length comes from each running engine's own /v1/models, read once per engine start."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker.engines.replica import ReplicaState
from worker.registry import EngineContextLengths, engine_context_length


@dataclass
class FakeReplica:
    """What EngineContextLengths reads of a replica: id, state, restart count and its HTTP client."""

    replica_id: str
    answers: list[Any]  # successive /v1/models bodies (an int is an HTTP status with no body)
    state: ReplicaState = ReplicaState.ready
    restarts: int = 0
    requests: int = 0
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/v1/models"
            self.requests += 1
            body = self.answers[min(self.requests, len(self.answers)) - 1]
            return httpx.Response(body) if isinstance(body, int) else httpx.Response(200, json=body)

        self.client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://engine")


def vllm_models(model_id: str, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "max_model_len": max_model_len}]}


async def test_reads_each_engine_once_per_start_and_takes_the_smallest() -> None:
    a0 = FakeReplica("a-0", [vllm_models("a", 4096)])
    a1 = FakeReplica("a-1", [vllm_models("a", 2048)], state=ReplicaState.starting)
    b0 = FakeReplica("b-0", [500, {"data": []}, {"oops": 1}, vllm_models("b", 999)])
    lengths = EngineContextLengths({"a": [a0, a1], "b": [b0]})  # type: ignore[dict-item]
    assert lengths("a") is None  # nothing read yet: the listing falls back to models.yaml

    await lengths.refresh()
    assert lengths("a") == 4096 and a1.requests == 0  # a starting replica is not asked
    a1.state = ReplicaState.ready
    await lengths.refresh()
    assert lengths("a") == 2048
    await lengths.refresh()
    assert (a0.requests, a1.requests) == (1, 1)  # read once per start

    a0.restarts = 1  # the engine restarted: its limit is read again
    a0.answers.append(vllm_models("a", 1024))
    await lengths.refresh()
    assert a0.requests == 2 and lengths("a") == 1024

    # An engine that never reports a limit is asked a few times per start, then left alone.
    for _ in range(5):
        await lengths.refresh()
    assert b0.requests == 3 and lengths("b") is None
    assert lengths("unknown") is None
    for replica in (a0, a1, b0):
        await replica.client.aclose()


async def test_background_polling_starts_and_stops() -> None:
    replica = FakeReplica("a-0", [vllm_models("a", 512)])
    lengths = EngineContextLengths({"a": [replica]}, interval_s=0.01)  # type: ignore[dict-item]
    await lengths.start()
    try:
        for _ in range(500):
            if lengths("a") is not None:
                break
            await asyncio.sleep(0.01)
    finally:
        await lengths.stop()
    assert lengths("a") == 512
    await replica.client.aclose()


def test_engine_context_length_parsing() -> None:
    assert engine_context_length(vllm_models("a", 100), "a") == 100
    # An external server serving one model under another name: its only entry counts.
    assert engine_context_length(vllm_models("other", 100), "a") == 100
    two = {"data": [{"id": "x", "max_model_len": 1}, {"id": "y", "max_model_len": 2}]}
    assert engine_context_length(two, "y") == 2
    assert engine_context_length(two, "z") is None
    for body in ({"data": [{"id": "a"}]}, {"data": [{"id": "a", "max_model_len": True}]},
                 {"data": [{"id": "a", "max_model_len": 0}]}, {"data": "x"}, [], None):
        assert engine_context_length(body, "a") is None
