"""Faults set through POST /mock/fault, each reset by {"mode": "none"}."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from tests.engines.mock.mock_engine_support import (
    asgi_client,
    chat_body,
    make_model,
    metric_value,
    served_client,
    sse_events,
    sse_json,
    wait_for_metrics,
)


async def set_fault(client: httpx.AsyncClient, **spec: object) -> None:
    response = await client.post("/mock/fault", json=spec)
    assert response.status_code == 200, response.text


async def test_fail_requests_answers_500_in_vllm_shape_until_reset() -> None:
    async with asgi_client(make_model()) as (client, _):
        await set_fault(client, mode="fail_requests")
        failed = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        health = await client.get("/health")
        await set_fault(client, mode="none")
        recovered = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))

    assert failed.status_code == 500
    error = failed.json()["error"]
    assert (error["type"], error["code"]) == ("InternalServerError", 500)
    assert health.status_code == 200
    assert recovered.status_code == 200


async def test_hang_stops_progress_but_health_stays_200_and_requests_queue() -> None:
    async with asgi_client(make_model()) as (client, _):
        await set_fault(client, mode="hang")
        pending = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(max_tokens=3)))
                   for _ in range(3)]
        text = await wait_for_metrics(client, lambda t: metric_value(t, "vllm:num_requests_waiting") == 3)
        assert metric_value(text, "vllm:num_requests_running") == 0
        assert (await client.get("/health")).status_code == 200
        for _ in range(50):
            await asyncio.sleep(0)
        assert not any(task.done() for task in pending)
        assert metric_value((await client.get("/metrics")).text, "vllm:generation_tokens_total") == 0

        await set_fault(client, mode="none")
        responses = await asyncio.gather(*pending)

    assert [response.status_code for response in responses] == [200, 200, 200]
    assert all(response.json()["usage"]["completion_tokens"] == 3 for response in responses)


async def test_slow_multiplies_step_time_and_is_reported() -> None:
    async with asgi_client(make_model()) as (client, app):
        await set_fault(client, mode="slow", factor=4)
        current = (await client.get("/mock/fault")).json()
        assert app.state.engine.faults.slowdown == 4
        response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        await set_fault(client, mode="none")
        assert app.state.engine.faults.slowdown == 1
    assert current["mode"] == "slow" and current["factor"] == 4
    assert response.status_code == 200


async def test_error_midstream_sends_vllm_error_event_then_done() -> None:
    async with asgi_client(make_model()) as (client, _):
        await set_fault(client, mode="error_midstream", after_tokens=3)
        streamed = await client.post("/v1/chat/completions", json=chat_body(
            max_tokens=50, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
        whole = await client.post("/v1/chat/completions", json=chat_body(max_tokens=50))
        short = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))

    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])
    assert error == {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                               "code": 500}}
    chunks = [orjson.loads(event) for event in events[:-2]]
    assert 3 <= chunks[-1]["usage"]["completion_tokens"] < 50
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    assert whole.status_code == 500 and whole.json()["error"]["code"] == 500
    assert short.status_code == 200  # finished before the fault was due


async def test_abort_midstream_cuts_the_connection_without_done() -> None:
    async with served_client(make_model()) as client:
        await set_fault(client, mode="abort_midstream", after_tokens=2)
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/completions",
                                     json={"prompt": "hi", "max_tokens": 100, "stream": True}) as response:
                assert response.status_code == 200
                async for data in response.aiter_bytes():
                    received += data
        await wait_for_metrics(client, lambda t: metric_value(
            t, "vllm:request_success_total", finished_reason="abort") == 1)
        await set_fault(client, mode="none")
        after_reset = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100,
                                                                "stream": True})
    assert b"[DONE]" not in received
    assert b'"text"' in received
    assert sse_json(after_reset.text)[-1]["choices"][0]["finish_reason"] == "length"


async def test_unknown_fault_mode_is_a_400() -> None:
    async with asgi_client(make_model()) as (client, _):
        response = await client.post("/mock/fault", json={"mode": "explode"})
    assert response.status_code == 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_healthy(process: subprocess.Popen[bytes], base_url: str) -> None:
    for _ in range(600):
        assert process.poll() is None, "the engine process ended before it was healthy"
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the engine never became healthy")


def test_crash_exits_the_engine_process_with_non_zero_status() -> None:
    port = _free_port()
    code = ("import sys; from worker.config import ModelConfig; from worker.engines.mock import run_mock_engine; "
            "run_mock_engine(ModelConfig.model_validate_json(sys.argv[1]), '127.0.0.1', int(sys.argv[2]))")
    process = subprocess.Popen([sys.executable, "-c", code, make_model().model_dump_json(), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, base_url)
        served_chat = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(max_tokens=2), timeout=5)
        assert served_chat.status_code == 200
        with contextlib.suppress(httpx.TransportError):  # the answer may not make it out before the exit
            httpx.post(f"{base_url}/mock/fault", json={"mode": "crash", "exit_code": 3}, timeout=5)
        assert process.wait(timeout=10) == 3
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
