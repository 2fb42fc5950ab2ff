"""Cache-aware placement end to end: turns of chat sessions over two replicas land where their history is
cached, report the cached tokens and pay the cache-read price. (How much better than load-only placement
that is, is the scheduler benchmark's to measure: bench/scheduler.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.capacity.capacity_support import FAST_HEALTH
from tests.support.worker_process import (
    WorkerProcess,
    eventually,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
)

MODEL = "acme/sessions"
SESSIONS = 6
TURNS = 5
PROMPT_PRICE, CACHED_PRICE, COMPLETION_PRICE = Decimal("1.00"), Decimal("0.10"), Decimal("2.00")


def _start(tmp_path: Path, policy: str) -> WorkerProcess:
    model = fast_mock_model(
        MODEL, replicas=2, routing={"policy": policy},
        engine_args={"max_model_len": 2048, "max_num_seqs": 16},
        mock={"step_base_ms": 2.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0,
              "num_kv_blocks": 400, "block_size": 16},  # ~6k tokens: half the sessions per replica
        pricing={"prompt_per_mtok": str(PROMPT_PRICE), "cached_prompt_per_mtok": str(CACHED_PRICE),
                 "completion_per_mtok": str(COMPLETION_PRICE)})
    config = {"worker": {"id": f"sessions-{policy}", "engine_health": FAST_HEALTH}, "models": [model]}
    return ready_or_stopped(start_worker(tmp_path, config, env={"WORKER_AUTH": "false"}))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = _start(tmp_path_factory.mktemp("sessions"), "cache_aware")
    try:
        yield proc
    finally:
        proc.stop()


async def _session(client: httpx.AsyncClient, number: int, headers: dict[str, str]) -> list[dict[str, Any]]:
    """One conversation: each turn sends the whole history (a long system prompt of its own, then turns)."""
    system = " ".join(f"session{number}-fact{i}" for i in range(300))
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    usages = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"question {turn} " + "more words " * 20})
        response = await client.post("/v1/chat/completions", headers=headers, json={
            "model": MODEL, "messages": messages, "max_tokens": 8})
        assert response.status_code == 200, response.text
        answer = response.json()
        usages.append({**answer["usage"], "replica": response.headers["x-worker-replica"]})
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return usages


async def _both_replicas_take_work(client: httpx.AsyncClient) -> bool:
    replicas = (await client.get("/capacity")).json()["models"][0]["replicas"]
    return all(view["state"] == "ready" for view in replicas)


async def _conversations(worker: WorkerProcess, session_header: bool) -> list[list[dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60) as client:
        # On a busy machine a replica's scrape can come late and count as full: start once both are fresh.
        assert await eventually(lambda: _both_replicas_take_work(client), timeout_s=30)
        return await asyncio.gather(*(
            _session(client, number, {"x-session-id": f"s{number}"} if session_header else {})
            for number in range(SESSIONS)))


@pytest.mark.parametrize("session_header", [False, True], ids=["by-prefix", "by-session-id"])
async def test_later_turns_hit_the_cache_and_pay_the_cache_read_price(
    worker: WorkerProcess, session_header: bool
) -> None:
    conversations = await _conversations(worker, session_header)
    later = [usage for usages in conversations for usage in usages[1:]]
    mostly_cached = [u for u in later if u["prompt_tokens_details"]["cached_tokens"] > u["prompt_tokens"] / 2]
    replicas_used = {usage["replica"] for usages in conversations for usage in usages}
    assert len(replicas_used) == 2  # both replicas serve: sessions are spread, their turns are not
    assert len(mostly_cached) >= 0.9 * len(later)
    for usage in later:
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        expected = ((usage["prompt_tokens"] - cached) * PROMPT_PRICE + cached * CACHED_PRICE
                    + usage["completion_tokens"] * COMPLETION_PRICE) / 1_000_000
        assert Decimal(str(usage["cost"])) == pytest.approx(expected, abs=Decimal("0.000001"))
