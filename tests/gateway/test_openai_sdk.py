"""The official OpenAI SDK, sync and async, against a real worker process on the CPU mock engine."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import orjson
import pytest

from tests.support.worker_process import WorkerProcess, fast_mock_model, start_worker

CHAT = "acme/chat-small"
EMBED = "acme/embed-small"
SLOW = "acme/chat-slow"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> WorkerProcess:
    config = {
        "worker": {"id": "test-worker", "max_body_bytes": 65536},
        "models": [
            fast_mock_model(CHAT, replicas=2),
            fast_mock_model(EMBED, task="embed"),
            fast_mock_model(SLOW, engine_args={"max_model_len": 4096, "max_num_seqs": 4},
                            mock={"step_base_ms": 50.0}),
        ],
    }
    proc = start_worker(tmp_path_factory.mktemp("worker"), config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_every_configured_model(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == [CHAT, EMBED, SLOW]


def test_chat_completion_non_streaming(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "hello there"}], max_tokens=8)
    completion = raw.parse()
    assert completion.model == CHAT
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    assert raw.headers["x-request-id"]
    assert raw.headers["x-worker-replica"].startswith("acme-chat-small-")


def test_chat_streaming_without_usage_hides_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "count"}], max_tokens=6, stream=True)
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text


def test_chat_streaming_with_usage_matches_streamed_tokens(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "count"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_and_n_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=CHAT, prompt="once upon a time", max_tokens=5, n=2)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    assert completion.usage.completion_tokens == 10


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=EMBED, input=["a", "b c"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0


def test_embeddings_on_generation_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=CHAT, input="a")
    assert caught.value.code == "unsupported_endpoint"


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_bad_field_is_400_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], n=0)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=[])


def test_context_length_exceeded_is_400_with_string_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert caught.value.code == "context_length_exceeded"
    assert isinstance(caught.value.body["code"], str)


def test_malformed_json_and_oversized_body(worker: WorkerProcess) -> None:
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    big = orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": "x" * 70000}]})
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", content=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_request_id_is_echoed_or_generated(worker: WorkerProcess) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = [httpx.post(f"{worker.base_url}/v1/chat/completions", json=body).headers["x-request-id"]
                 for _ in range(3)]
    assert all(request_id.startswith("req-") for request_id in generated)
    # Time-ordered (UUIDv7), like the ledger's record ids: the ledger's indexes on them grow at one end.
    assert generated == sorted(generated) and len(set(generated)) == 3
    response = httpx.get(f"{worker.base_url}/no/such/path")
    assert response.status_code == 404 and response.headers["x-request-id"]
    assert response.json()["error"]["code"] == "not_found"


async def test_async_client_streams_concurrently(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> int:
        stream = await async_client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    results = await asyncio.gather(*(one(i) for i in range(12)))
    assert results == [4] * 12


async def test_async_client_errors(async_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await async_client.completions.create(model="missing", prompt="x")


def test_concurrent_requests_spread_over_replicas(worker: WorkerProcess) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30}

    def serve_one(_: int) -> str:
        return httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=30).headers["x-worker-replica"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        seen = set(pool.map(serve_one, range(16)))
    assert seen == {"acme-chat-small-0", "acme-chat-small-1"}


def _engine_metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_aborts_engine_request(worker: WorkerProcess) -> None:
    # 2,000 tokens at 50 ms a step would run for 100 s; only an abort frees the engine within the wait.
    ports = worker.engine_ports(SLOW)
    body = {"model": SLOW, "messages": [{"role": "user", "content": "long"}], "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions", json=body) as response:
        chunks = response.iter_bytes()  # kept referenced: a closed iterator would close the connection
        next(chunks)
        assert sum(_engine_metric(p, "vllm:num_requests_running") for p in ports) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(_engine_metric(p, "vllm:num_requests_running") for p in ports) == 0:
            break
        time.sleep(0.1)
    assert sum(_engine_metric(p, "vllm:num_requests_running") for p in ports) == 0


def test_non_streaming_disconnect_aborts_engine_request(worker: WorkerProcess) -> None:
    ports = worker.engine_ports(SLOW)
    body = {"model": SLOW, "messages": [{"role": "user", "content": "long"}], "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(_engine_metric(p, "vllm:num_requests_running") for p in ports) == 0:
            break
        time.sleep(0.1)
    assert sum(_engine_metric(p, "vllm:num_requests_running") for p in ports) == 0
