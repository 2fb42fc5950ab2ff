"""Helpers for capacity tests: worker configs on the mock engine, SSE reading and polling."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.support.worker_process import WorkerProcess, fast_mock_model, wait_until  # noqa: F401 (re-exported)
from worker.config import ModelConfig, Pricing
from worker.config.models import AdmissionConfig
from worker.engines.base import Engine, EngineExited

# Engine watching tuned for tests: fast scrapes, and stats allowed to age on a busy test machine
# without counting as saturated.
FAST_HEALTH = {"stats_interval_s": 0.1, "stats_stale_after_s": 2.0, "probe_interval_s": None}


def worker_config(*models: dict[str, Any], **worker: Any) -> dict[str, Any]:
    return {"worker": {"id": "capacity-worker", "restart_backoff_initial_s": 0.2,
                       "engine_health": FAST_HEALTH, **worker},
            "models": list(models)}


def paced_model(model_id: str, *, step_ms: float, max_num_seqs: int = 16, **overrides: Any) -> dict[str, Any]:
    """A mock model whose every engine step (one token for each running request) takes `step_ms`."""
    return fast_mock_model(model_id, engine_args={"max_model_len": 4096, "max_num_seqs": max_num_seqs},
                           mock={"step_base_ms": step_ms, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
                           **overrides)


def chat_body(model: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": max_tokens, "stream": stream}


def sse_events(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE stream, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def assert_ended_with_error_chunk(lines: list[str]) -> dict[str, Any]:
    events = sse_events(lines)
    assert events[-1] == "[DONE]", events[-3:]
    chunk = orjson.loads(events[-2])
    assert chunk["choices"][0]["finish_reason"] == "error"
    assert chunk["error"]["code"]
    return chunk


def assert_finished_normally(lines: list[str]) -> None:
    events = sse_events(lines)
    assert events[-1] == "[DONE]", events[-3:]
    reasons = [choice.get("finish_reason") for event in events[:-1]
               for choice in orjson.loads(event).get("choices") or ()]
    assert reasons[-1] in ("length", "stop") and "error" not in reasons


def engine_port(worker: WorkerProcess, model_id: str) -> int:
    [port] = worker.engine_ports(model_id)
    return port


def set_fault(port: int, **fault: Any) -> None:
    httpx.post(f"http://127.0.0.1:{port}/mock/fault", json=fault, timeout=5).raise_for_status()


def metric_value(worker: WorkerProcess, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{worker.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


class IdleEngine(Engine):
    """An engine that is never started: replicas built on it exist only in memory."""

    kind = "mock"

    async def start(self) -> None: ...

    async def wait_exit(self) -> EngineExited:
        raise NotImplementedError

    async def stop(self, timeout_s: float) -> None: ...

    @property
    def pid(self) -> int | None:
        return None


def in_memory_model(**admission: Any) -> ModelConfig:
    return ModelConfig(id="acme/m", engine="mock", source="x", engine_args={"max_model_len": 512, "max_num_seqs": 8},
                       pricing=Pricing(prompt_per_mtok=1, completion_per_mtok=1),
                       admission=AdmissionConfig(**admission))
