"""The official OpenAI SDK, sync and async, against a worker running real vLLM engines on the CPU.

One worker serves a tiny random-weight Llama chat model and a tiny BERT embedding model for the
whole module (each vLLM engine takes ~30 s and ~2 GB to start). Generated text is gibberish, so the
tests assert on structure, token accounting and the worker's behaviour, never on words.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import WorkerProcess, start_worker
from worker.capacity.stats import EngineStats
from worker.capacity.watchdog import FILTERED_METRICS_PARAMS, FILTERED_METRICS_PATH

pytestmark = pytest.mark.vllm

CHAT = "tiny-chat"
EMBED = "tiny-embed"
# The chat model's context, past the tiny model's own 2048 positions (raised with hf_overrides): a stream the
# client leaves after its first token is then still far from done when the hang-up reaches a busy engine.
MAX_MODEL_LEN = 8192
# The tiny BERT's own limit (its max_position_embeddings).
EMBED_MAX_MODEL_LEN = 512
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# Under pytest-timeout's 300 s per test, so a slow start fails with the worker's log.
ENGINE_START_TIMEOUT_S = 240.0
# vLLM's own extension: generate exactly max_tokens, so token counts are known in advance.
IGNORE_EOS = {"ignore_eos": True}
PRICING = {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"}


def vllm_model(model_id: str, source: Path, **overrides: object) -> dict:
    model = {
        "id": model_id,
        "engine": "vllm",
        "source": str(source),
        "engine_args": {"dtype": "bfloat16", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                        "max_num_seqs": 16, "hf_overrides": {"max_position_embeddings": MAX_MODEL_LEN}},
        "pricing": PRICING,
    }
    model.update(overrides)
    return model


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
           tiny_embedding_model_dir: Path) -> Iterator[WorkerProcess]:
    config = {
        "worker": {"id": "vllm-test-worker", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S,
                   "restart_backoff_initial_s": 0.5},
        "models": [
            vllm_model(CHAT, tiny_model_dir),
            # float32: vLLM 0.32's CPU backend kills its worker on the first bfloat16 BERT batch in eager mode.
            vllm_model(EMBED, tiny_embedding_model_dir, task="embed",
                       engine_args={"dtype": "float32", "max_model_len": EMBED_MAX_MODEL_LEN,
                                    "enforce_eager": True, "max_num_seqs": 16}),
        ],
    }
    proc = start_worker(tmp_path_factory.mktemp("vllm-worker"), config, engine="config")
    try:
        proc.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def async_client(worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


def metric_total(base_url: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition, timeout_s: float, interval_s: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


def vllm_servers(worker: WorkerProcess, model_id: str) -> list[psutil.Process]:
    """The vLLM API server processes (not their guards) serving `model_id`."""
    servers = []
    for proc in worker.descendants():
        try:
            cmd = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if VLLM_SERVER_MODULE in cmd and "worker.engines.guard" not in cmd and model_id in cmd:
            servers.append(proc)
    return servers


# -- chat and text completions ---------------------------------------------------------------------


def test_models_lists_both_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [CHAT, EMBED]


def test_chat_completion_usage_and_provenance_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=chat("hello there"), max_tokens=8, extra_body=IGNORE_EOS,
        extra_headers={"x-request-id": "vllm-test-1"})
    completion = raw.parse()
    assert raw.headers["x-request-id"] == "vllm-test-1"
    assert raw.headers["x-worker-replica"] == "tiny-chat-0"
    assert completion.model == CHAT
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_request_id_is_generated_when_absent(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=chat("hi"), max_tokens=1)
    assert raw.headers["x-request-id"].startswith("req-")


def test_streaming_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=chat("count"), max_tokens=6, stream=True, extra_body=IGNORE_EOS)
    chunks = list(stream)
    assert chunks
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}


def test_streaming_usage_chunk_matches_non_streaming_usage(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=CHAT, messages=chat("count"), max_tokens=6, extra_body=IGNORE_EOS)
    stream = client.chat.completions.create(
        model=CHAT, messages=chat("count"), max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body=IGNORE_EOS)
    chunks = list(stream)
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.total_tokens == plain.usage.prompt_tokens + 6


def test_chat_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT, messages=chat("pick"), max_tokens=5, n=3, extra_body=IGNORE_EOS)
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    assert completion.usage.completion_tokens == 15

    stream = client.chat.completions.create(
        model=CHAT, messages=chat("pick"), max_tokens=5, n=2, stream=True, stream_options={"include_usage": True},
        extra_body=IGNORE_EOS)
    chunks = list(stream)
    finishes = {choice.index: choice.finish_reason for chunk in chunks for choice in chunk.choices
                if choice.finish_reason}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=CHAT, prompt="once upon a time", max_tokens=7, n=2, extra_body=IGNORE_EOS)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    assert all(choice.finish_reason == "length" for choice in completion.choices)
    assert completion.usage.completion_tokens == 14

    stream = client.completions.create(
        model=CHAT, prompt="once upon a time", max_tokens=7, stream=True, stream_options={"include_usage": True},
        extra_body=IGNORE_EOS)
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def _stop_string_inside(text: str) -> tuple[str, int]:
    """A short ASCII stop string that first occurs well inside `text`, and where."""
    for start in (len(text) // 3, 1):
        for index in range(start, len(text) - 2):
            candidate = text[index:index + 3]
            if candidate.isascii() and candidate.isalpha() and text.find(candidate) == index:
                return candidate, index
    raise AssertionError(f"no usable stop string in the generated text {text!r}")


def test_stop_string_ends_with_finish_reason_stop(client: openai.OpenAI) -> None:
    # Greedy decoding makes the second request generate the same text as the first, up to the stop string.
    params = {"model": CHAT, "messages": chat("Tokens stream back to the client"), "temperature": 0,
              "max_tokens": 24, "extra_body": IGNORE_EOS}
    full = client.chat.completions.create(**params).choices[0].message.content
    stop, index = _stop_string_inside(full)

    stopped = client.chat.completions.create(**params, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[:index]
    assert stopped.usage.completion_tokens < 24

    chunks = list(client.chat.completions.create(**params, stop=[stop], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:index]


# -- errors ---------------------------------------------------------------------------------------------


def test_prompt_over_the_context_is_context_length_exceeded(client: openai.OpenAI) -> None:
    # More words than the context holds, but fewer than twice as many: the gateway cannot prove the
    # overflow from word counts (it counts one token per two words), vLLM refuses it.
    long_prompt = "word " * (MAX_MODEL_LEN + 188)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=chat(long_prompt), max_tokens=8)
    assert caught.value.code == "context_length_exceeded"
    assert isinstance(caught.value.body["code"], str)
    assert caught.value.body["type"] == "invalid_request_error"
    # Refused before any stream starts, so streaming clients get the same error, not a broken stream.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=chat(long_prompt), max_tokens=8, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_token_id_prompt_over_the_context_is_refused_by_the_gateway(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CHAT, prompt=[5] * (MAX_MODEL_LEN + 10), max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "prompt"


def test_max_tokens_over_max_model_len_is_refused_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=chat("hi"), max_tokens=MAX_MODEL_LEN + 88)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "max_tokens"


def test_prompt_plus_max_tokens_over_the_context_is_clamped_by_vllm(client: openai.OpenAI) -> None:
    # vLLM 0.32 does not refuse a request whose prompt fits but whose max_tokens does not: it generates
    # up to the end of the context. The gateway passes that on unchanged.
    prompt_tokens = MAX_MODEL_LEN - 12
    completion = client.completions.create(
        model=CHAT, prompt=[5] * prompt_tokens, max_tokens=50, extra_body=IGNORE_EOS)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == MAX_MODEL_LEN - prompt_tokens


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=chat("x"), max_tokens=1)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_wrong_endpoint_for_the_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=CHAT, input="x")
    assert caught.value.code == "unsupported_endpoint"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED, messages=chat("x"), max_tokens=1)
    assert caught.value.code == "unsupported_endpoint"


# -- embeddings -------------------------------------------------------------------------------------


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=EMBED, input=["hello world", "the quick brown fox"])
    assert [item.index for item in result.data] == [0, 1]
    assert {len(item.embedding) for item in result.data} == {128}  # the tiny BERT's hidden size
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


# -- async SDK ------------------------------------------------------------------------------------------


async def test_async_client_streams_concurrently(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> int:
        stream = await async_client.chat.completions.create(
            model=CHAT, messages=chat(f"request {i}"), max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return usage.completion_tokens

    assert await asyncio.gather(*(one(i) for i in range(8))) == [12] * 8


async def test_async_client_embeddings_and_errors(async_client: openai.AsyncOpenAI) -> None:
    result = await async_client.embeddings.create(model=EMBED, input="a single input")
    assert len(result.data) == 1
    with pytest.raises(openai.NotFoundError):
        await async_client.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client.chat.completions.create(model=CHAT, messages=chat("hi"), max_tokens=10_000)
    assert caught.value.code == "context_length_exceeded"


# -- metrics, disconnects, supervision ------------------------------------------------------------------


def test_worker_metrics_show_both_replicas_ready(worker: WorkerProcess) -> None:
    response = httpx.get(f"{worker.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    for replica in ("tiny-chat-0", "tiny-embed-0"):
        assert metric_total(worker.base_url, "worker_replica_state", replica=replica, state="ready") == 1


def test_vllm_answers_the_filtered_scrape_admission_makes(worker: WorkerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=CHAT, messages=chat("hi"), max_tokens=2)
    (port,) = worker.engine_ports(CHAT)
    engine_url = f"http://127.0.0.1:{port}"

    filtered = httpx.get(engine_url + FILTERED_METRICS_PATH, params=FILTERED_METRICS_PARAMS, timeout=10)
    whole = httpx.get(f"{engine_url}/metrics", timeout=10)

    assert filtered.status_code == 200
    names = {sample.name for family in text_string_to_metric_families(filtered.text) for sample in family.samples}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names
    assert names <= set(FILTERED_METRICS_PARAMS["name[]"])
    assert "vllm:cache_config_info" in names  # for the node-level view, /metrics/node
    assert len(filtered.content) * 10 < len(whole.content)
    stats = EngineStats.from_vllm_scrape(filtered.text)
    assert stats.tokens_total == EngineStats.from_vllm_scrape(whole.text).tokens_total
    # The node's /metrics still carries the engine's whole page, histograms included.
    assert metric_total(worker.base_url, "vllm:time_to_first_token_seconds_count", replica="tiny-chat-0") > 0


def test_node_view_reads_vllms_own_cache_config(worker: WorkerProcess) -> None:
    page = httpx.get(f"{worker.base_url}/metrics/node", timeout=10).text
    families = {family.name: family.samples for family in text_string_to_metric_families(page)}
    [cache] = [s for s in families["vllm:cache_config_info"] if s.labels["model_name"] == CHAT]
    assert int(cache.labels["num_gpu_blocks"]) > 0 and int(cache.labels["block_size"]) > 0
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert {s.labels["model_name"] for s in families[name]} == {CHAT, EMBED}, name


def test_client_disconnect_mid_stream_aborts_the_vllm_request(worker: WorkerProcess) -> None:
    (port,) = worker.engine_ports(CHAT)
    engine_url = f"http://127.0.0.1:{port}"
    generated_before = metric_total(engine_url, "vllm:generation_tokens_total")
    finished_before = metric_total(engine_url, "vllm:request_success_total", finished_reason="length")
    max_tokens = MAX_MODEL_LEN - 64  # the whole context but the chat prompt's few tokens
    body = {"model": CHAT, "messages": chat("go on"), "max_tokens": max_tokens, "stream": True, **IGNORE_EOS}
    with httpx.stream("POST", f"{worker.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()  # kept referenced: a closed iterator would close the connection
        # The first token, not an SSE keep-alive comment sent while vLLM had not yet taken the request.
        next(chunk for chunk in chunks if b"data: " in chunk)
        # Hang up at once: vLLM's engine core generates without waiting for anyone to read, and on a
        # loaded machine it had all of 480 tokens done before this first one even reached the client.
    assert wait_until(lambda: metric_total(engine_url, "vllm:num_requests_running") == 0, timeout_s=30), \
        "vLLM still runs the request the client left"
    # vLLM dropped the request before it had generated what it asked for: it never finished, and how
    # far it got depends on how busy the machine is.
    assert metric_total(engine_url, "vllm:request_success_total", finished_reason="length") == finished_before
    generated = metric_total(engine_url, "vllm:generation_tokens_total") - generated_before
    assert 0 < generated < max_tokens


def test_killed_vllm_server_is_restarted_and_serves_again(worker: WorkerProcess, client: openai.OpenAI) -> None:
    # Runs last: it takes the chat replica down for one engine start-up.
    (server,) = vllm_servers(worker, CHAT)
    engine_tree = server.children(recursive=True)
    assert engine_tree, "vLLM's engine core runs in child processes of its API server"

    server.send_signal(signal.SIGKILL)

    assert wait_until(
        lambda: metric_total(worker.base_url, "worker_replica_restarts_total", replica="tiny-chat-0") >= 1,
        timeout_s=ENGINE_START_TIMEOUT_S)
    assert wait_until(lambda: [s.pid for s in vllm_servers(worker, CHAT)] not in ([], [server.pid]),
                      timeout_s=ENGINE_START_TIMEOUT_S)
    worker.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
    (new_server,) = vllm_servers(worker, CHAT)
    assert new_server.pid != server.pid
    # The dead server's engine core and workers did not outlive it.
    assert not [proc for proc in engine_tree if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]

    completion = client.chat.completions.create(model=CHAT, messages=chat("back"), max_tokens=4,
                                                extra_body=IGNORE_EOS)
    assert completion.usage.completion_tokens == 4
    assert metric_total(worker.base_url, "worker_replica_state", replica="tiny-chat-0", state="ready") == 1
