"""Helpers for mock engine tests: a model config, an in-process client and a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI

from worker.config import ModelConfig
from worker.engines.mock import build_mock_app


def make_model(*, engine_args: dict[str, Any] | None = None, task: str = "generate", model_id: str = "mock-model",
               **mock: Any) -> ModelConfig:
    return ModelConfig.model_validate({
        "id": model_id,
        "engine": "mock",
        "source": f"mock://{model_id}",
        "task": task,
        "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "2"},
        "engine_args": {"max_model_len": 256, **(engine_args or {})},
        # No simulated compute unless a test asks for it: tests stay fast.
        "mock": {"step_base_ms": 0, "step_per_seq_ms": 0, "prefill_per_token_ms": 0, **mock},
    })


@contextlib.asynccontextmanager
async def asgi_client(model: ModelConfig) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """Client talking to the app in-process (responses arrive whole: no streaming, no disconnects)."""
    app = build_mock_app(model)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
            yield client, app
    finally:
        await app.state.engine.aclose()


@contextlib.asynccontextmanager
async def served(model: ModelConfig) -> AsyncIterator[tuple[str, FastAPI]]:
    """The app behind a real uvicorn on a free loopback port, in this event loop."""
    app = build_mock_app(model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical",
                                           access_log=False, lifespan="on", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def served_client(model: ModelConfig) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app behind a real uvicorn (true streaming and disconnects)."""
    async with served(model) as (base_url, _), httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking vLLM's framing (`data: ...` + blank line)."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: "):] for event in events]


def sse_json(raw: str) -> list[dict[str, Any]]:
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name}{labels} not found")


async def wait_for_metrics(client: httpx.AsyncClient, condition: Any, attempts: int = 500) -> str:
    """Polls /metrics until `condition(text)` holds (the engine runs concurrently)."""
    for _ in range(attempts):
        text = (await client.get("/metrics")).text
        if condition(text):
            return text
        await asyncio.sleep(0.01)
    raise AssertionError("metrics never reached the expected state:\n" + text)


def chat_body(content: str = "Tell me a story.", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **extra}
