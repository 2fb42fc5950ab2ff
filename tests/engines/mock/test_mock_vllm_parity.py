"""The mock answers in the same shapes as a real vLLM 0.32 (tests/fixtures/vllm_samples, recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.engines.mock.mock_engine_support import asgi_client, make_model, sse_json

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "vllm_samples"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    request: dict[str, Any] | None
    status: int
    body: str


def recorded(name: str) -> Recorded:
    head, _, body = (SAMPLES / name).read_text().partition("\n---\n")
    lines = head.split("\n")
    method, path = lines[0].split(" ", 1)
    # The recordings abbreviate a 700-word prompt as `"<"word " x 700>"`.
    request_line = lines[1].replace('"<"word " x 700>"', orjson.dumps("word " * 700).decode())
    request = orjson.loads(request_line) if request_line.startswith("{") else None
    status_line = next(line for line in lines if line.startswith("--- status "))
    return Recorded(method, path, request, int(status_line.split()[-1]), body)


# The mock's one addition to vLLM's answers: `usage.gpu_seconds`, its exact GPU time per request.
MOCK_EXTENSIONS = frozenset({"gpu_seconds"})


def shape(value: Any) -> Any:
    """Keys (in order) and nesting, without the values (a stop_reason may be a string or null)."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items() if key not in MOCK_EXTENSIONS]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "scalar"


async def replay(name: str, **model_options: Any) -> tuple[Recorded, int, str]:
    sample = recorded(name)
    model = make_model(model_id="tiny-chat", engine_args={"max_model_len": 512}, **model_options)
    async with asgi_client(model) as (client, _):
        response = await client.request(sample.method, sample.path, json=sample.request)
    return sample, response.status_code, response.text


@pytest.mark.parametrize("name", [
    "error_context_length_chat.txt",
    "error_context_length_chat_stream.txt",
    "error_context_length_completion.txt",
    "error_max_tokens_too_large.txt",
    "error_unknown_model.txt",
    "error_bad_request.txt",
])
async def test_errors_match_vllm_byte_for_byte(name: str) -> None:
    sample, status, body = await replay(name)
    assert status == sample.status
    assert body == sample.body.strip()


async def test_generation_routes_do_not_exist_on_an_embedding_model() -> None:
    sample = recorded("error_chat_on_embedding_model.txt")
    async with asgi_client(make_model(model_id="tiny-embed", task="embed")) as (client, _):
        response = await client.post(sample.path, json=sample.request)
    assert (response.status_code, response.text) == (sample.status, sample.body.strip())


@pytest.mark.parametrize("name", ["chat_completion.txt", "chat_completion_n2.txt", "completion.txt",
                                  "completion_stop.txt", "models.txt", "tokenize.txt", "version.txt"])
async def test_json_responses_have_vllm_shape(name: str) -> None:
    sample, status, body = await replay(name)
    assert status == sample.status
    assert shape(orjson.loads(body)) == shape(orjson.loads(sample.body))


async def test_embeddings_have_vllm_shape() -> None:
    sample = recorded("embeddings.txt")
    async with asgi_client(make_model(model_id="tiny-embed", task="embed")) as (client, _):
        response = await client.post(sample.path, json=sample.request)
    assert shape(response.json()) == shape(orjson.loads(sample.body))


@pytest.mark.parametrize("name", ["chat_completion_stream.txt", "chat_completion_stream_no_usage.txt",
                                  "chat_completion_stream_n2.txt", "chat_completion_stop_stream.txt",
                                  "completion_stream.txt"])
async def test_streams_have_vllm_chunk_shapes(name: str) -> None:
    sample, status, body = await replay(name)
    assert status == sample.status
    ours, theirs = sse_json(body), sse_json(sample.body)
    # First chunk(s), a content chunk, the finish chunk and (when asked) the usage chunk look alike.
    assert shape(ours[0]) == shape(theirs[0])
    assert shape(ours[-1]) == shape(theirs[-1])
    finish = [c for c in ours if c["choices"] and c["choices"][0]["finish_reason"]]
    recorded_finish = [c for c in theirs if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [shape(c) for c in finish] == [shape(c) for c in recorded_finish]
    content = [c for c in ours if c["choices"] and "role" not in c["choices"][0].get("delta", {})]
    assert shape(content[0]) == shape(next(c for c in theirs if c["choices"] and "role" not in c["choices"][0].get(
        "delta", {})))
    if "include_usage" in body or theirs[-1]["choices"] == []:
        assert ours[-1]["choices"] == [] == theirs[-1]["choices"]


async def test_filtered_metrics_answer_only_the_named_samples_as_vllm_does() -> None:
    # vLLM mounts prometheus_client's exporter at /metrics/ (with the slash): `name[]` picks samples.
    names = ["vllm:num_requests_running", "vllm:generation_tokens_total"]
    async with asgi_client(make_model()) as (client, _):
        filtered = await client.get("/metrics/", params=[("name[]", name) for name in names])
        everything = await client.get("/metrics/")
        whole = await client.get("/metrics")
    sampled = {line.split("{")[0].split(" ")[0] for line in filtered.text.splitlines() if not line.startswith("#")}
    assert filtered.status_code == 200
    assert sampled == set(names)
    assert everything.text == whole.text
