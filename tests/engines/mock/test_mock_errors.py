"""Refusals in vLLM 0.32's shapes: `{"error": {message, type, param, code: <int>}}` or FastAPI's 404."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engines.mock.mock_engine_support import asgi_client, chat_body, make_model
from worker.engines.mock import build_mock_app


def assert_vllm_error(body: dict[str, Any], status: int, error_type: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["code"], int)
    assert error["type"] == error_type
    return error


async def test_prompt_longer_than_the_context_is_a_400_with_vllm_message() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 32})) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat_body("word " * 40, max_tokens=4))
    assert response.status_code == 400
    error = assert_vllm_error(response.json(), 400, "BadRequestError")
    # Like vLLM, which stops tokenizing text one token past the limit.
    assert error["message"] == (
        "This model's maximum context length is 32 tokens. However, your prompt contains at least 33 input "
        "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
        "prompt. (parameter=input_tokens, value=33)")
    assert error["param"] == "input_tokens"


async def test_token_id_prompt_longer_than_the_context_reports_its_length() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 32})) as (client, _):
        response = await client.post("/v1/completions", json={"prompt": list(range(40)), "max_tokens": 4})
    assert response.status_code == 400
    error = assert_vllm_error(response.json(), 400, "BadRequestError")
    assert "your prompt contains 40 input tokens" in error["message"]


async def test_prompt_that_leaves_no_room_to_generate_is_a_400() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 10})) as (client, _):
        response = await client.post("/v1/completions", json={"prompt": "a b c d e f g h i j", "max_tokens": 1})
    assert response.status_code == 400
    error = assert_vllm_error(response.json(), 400, "BadRequestError")
    assert "maximum model length of 10" in error["message"]


async def test_max_tokens_above_the_context_length_is_a_400() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 64})) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=65))
        completion = await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=100))
    error = assert_vllm_error(response.json(), 400, "BadRequestError")
    assert error["message"] == ("max_tokens=65 cannot be greater than max_model_len=64. "
                                "Please request fewer output tokens. (parameter=max_tokens, value=65)")
    assert error["param"] == "max_tokens"
    assert assert_vllm_error(completion.json(), 400, "BadRequestError")["param"] == "max_completion_tokens"


async def test_unknown_model_is_a_404() -> None:
    async with asgi_client(make_model()) as (client, _):
        response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "other"})
    assert response.status_code == 404
    error = assert_vllm_error(response.json(), 404, "NotFoundError")
    assert error["message"] == "The model `other` does not exist. Valid aliases: mock-model."
    assert error["param"] == "model"


async def test_malformed_requests_are_400s() -> None:
    async with asgi_client(make_model()) as (client, _):
        not_json = await client.post("/v1/chat/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
        no_messages = await client.post("/v1/chat/completions", json={"model": "mock-model"})
        bad_n = await client.post("/v1/chat/completions", json=chat_body(n=0))
        options_without_stream = await client.post("/v1/chat/completions", json=chat_body(
            stream_options={"include_usage": True}))
        logprobs = await client.post("/v1/chat/completions", json=chat_body(logprobs=True))
        zero_tokens = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0})
        empty_prompt = await client.post("/v1/completions", json={"prompt": ""})

    for response in (not_json, no_messages, bad_n, options_without_stream, logprobs, zero_tokens, empty_prompt):
        assert response.status_code == 400, response.text
        assert_vllm_error(response.json(), 400, response.json()["error"]["type"])
    assert no_messages.json()["error"]["param"] == "body.messages"
    assert "Stream options can only be defined when `stream=True`." in options_without_stream.json()["error"][
        "message"]


async def test_endpoints_of_the_other_task_do_not_exist() -> None:
    async with asgi_client(make_model()) as (client, _):
        embeddings = await client.post("/v1/embeddings", json={"input": "hi"})
    async with asgi_client(make_model(task="embed")) as (client, _):
        chat = await client.post("/v1/chat/completions", json=chat_body())
        completions = await client.post("/v1/completions", json={"prompt": "hi"})
    for response in (embeddings, chat, completions):
        assert response.status_code == 404
        assert response.json() == {"detail": "Not Found"}


async def test_embedding_dimensions_other_than_the_models_are_refused() -> None:
    async with asgi_client(make_model(task="embed", embedding_dim=8)) as (client, _):
        response = await client.post("/v1/embeddings", json={"input": "hi", "dimensions": 4})
    assert response.status_code == 400
    assert_vllm_error(response.json(), 400, "BadRequestError")


def test_engine_refuses_to_start_when_one_full_sequence_does_not_fit_the_kv_cache() -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        build_mock_app(make_model(engine_args={"max_model_len": 1024}, num_kv_blocks=10, block_size=16))
