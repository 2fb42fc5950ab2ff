"""The mock engine behind a real uvicorn: the official SDK, batching seen through /metrics, disconnects."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.engines.mock.mock_engine_support import (
    chat_body,
    make_model,
    metric_value,
    served,
    served_client,
    wait_for_metrics,
)


async def test_openai_sdk_streams_chat_with_usage() -> None:
    async with served(make_model()) as (base_url, _):
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "Say something."}], max_tokens=12,
                stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            models = await client.models.list()
        finally:
            await client.close()

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert text.strip()
    assert [model.id for model in models.data] == ["mock-model"]


async def test_running_requests_are_capped_by_max_num_seqs_and_the_rest_wait() -> None:
    model = make_model(engine_args={"max_num_seqs": 2}, step_base_ms=20)
    async with served_client(model) as client:
        requests = [asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 200}))
                    for _ in range(5)]
        seen_running: list[float] = []

        def saturated(text: str) -> bool:
            seen_running.append(metric_value(text, "vllm:num_requests_running"))
            return seen_running[-1] == 2 and metric_value(text, "vllm:num_requests_waiting") == 3

        await wait_for_metrics(client, saturated)
        for task in requests:
            task.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        text = await wait_for_metrics(client, lambda t: metric_value(t, "vllm:num_requests_running") == 0
                                      and metric_value(t, "vllm:num_requests_waiting") == 0)
    assert max(seen_running) <= 2
    # Cancelled clients mean aborted requests, and their KV blocks are free again.
    assert metric_value(text, "vllm:request_success_total", finished_reason="abort") == 5
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0


async def test_kv_cache_budget_holds_back_admission() -> None:
    # 16 blocks of 16 tokens; each ~100-token prompt takes 7 blocks, so only two run at once.
    model = make_model(engine_args={"max_num_seqs": 64}, num_kv_blocks=16, block_size=16, step_base_ms=20)
    prompt = " ".join(["word"] * 100)
    async with served_client(model) as client:
        requests = [asyncio.create_task(client.post("/v1/completions", json={"prompt": prompt,
                                                                            "max_tokens": 50}))
                    for _ in range(3)]
        text = await wait_for_metrics(client, lambda t: metric_value(t, "vllm:num_requests_running") == 2
                                      and metric_value(t, "vllm:num_requests_waiting") == 1)
        assert metric_value(text, "vllm:kv_cache_usage_perc") > 0.8
        assert metric_value(text, "vllm:cache_config_info", block_size="16", num_gpu_blocks="16") == 1
        responses = await asyncio.gather(*requests)
        final = (await client.get("/metrics")).text
    assert all(response.json()["usage"]["completion_tokens"] == 50 for response in responses)
    assert metric_value(final, "vllm:num_preemptions_total") >= 1
    assert metric_value(final, "vllm:generation_tokens_total") == 150
    assert metric_value(final, "vllm:prompt_tokens_total") == 300


async def test_client_disconnect_aborts_the_request() -> None:
    async with served_client(make_model(step_base_ms=5)) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat_body(max_tokens=200, stream=True)) as response:
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
            running = metric_value((await client.get("/metrics")).text, "vllm:num_requests_running")
        # Leaving the block closed the connection mid-stream.
        text = await wait_for_metrics(client, lambda t: metric_value(
            t, "vllm:request_success_total", finished_reason="abort") == 1)
    assert running == 1
    assert metric_value(text, "vllm:num_requests_running") == 0
    assert metric_value(text, "vllm:generation_tokens_total") < 200


async def test_client_giving_up_on_a_non_streaming_request_aborts_it() -> None:
    async with served_client(make_model(step_base_ms=5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 200},
                              timeout=httpx.Timeout(5.0, read=0.2))
        text = await wait_for_metrics(client, lambda t: metric_value(
            t, "vllm:request_success_total", finished_reason="abort") == 1)
    assert metric_value(text, "vllm:num_requests_running") == 0
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0
