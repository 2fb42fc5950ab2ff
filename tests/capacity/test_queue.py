"""The worker's queue end to end: bursts the engines can absorb are served, not refused; overload is shed
with 429 before any byte; a client that leaves while queued never reaches the engine; one account's
backlog does not hold back another's first request; SIGTERM ends what is still queued cleanly. Also
through several gateway processes (the queue lives in the worker process, which decides for them)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.capacity.capacity_support import FAST_HEALTH, assert_finished_normally, chat_body, paced_model
from tests.support.worker_process import WorkerProcess, eventually, ready_or_stopped, start_worker

MODEL = "acme/queued"
SEQS = 8
ADMIN_TOKEN = "queue-admin-token-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _start(tmp_path: Path, processes: int = 1, **admission: object) -> WorkerProcess:
    # 10 ms a step, 8 batch slots, no queue allowance at the engine: 5 tokens take ~60 ms.
    model = paced_model(MODEL, step_ms=10.0, max_num_seqs=SEQS, admission={"queue_allowance": 0, **admission},
                        routing={"policy": "least_loaded"})
    config = {"worker": {"id": f"queue-worker-{processes}", "gateway_processes": processes,
                         "restart_backoff_initial_s": 0.2, "drain_grace_s": 5,
                         "engine_health": FAST_HEALTH},
              "models": [model]}
    env = {"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = start_worker(tmp_path, config, env=env)
    return ready_or_stopped(proc, lambda: len(proc.gateway_processes()) == (processes if processes > 1 else 0))


@pytest.fixture(scope="module", params=[1, 3], ids=["one-process", "three-gateway-processes"])
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = _start(tmp_path_factory.mktemp("queue"), request.param)
    try:
        yield proc
    finally:
        proc.stop()


def new_key(worker: WorkerProcess) -> str:
    account = httpx.post(f"{worker.base_url}/admin/accounts", headers=ADMIN,
                         json={"name": "acme", "initial_balance_usd": "50"})
    assert account.status_code == 201, account.text
    key = httpx.post(f"{worker.base_url}/admin/keys", headers=ADMIN,
                     json={"account_id": account.json()["data"]["id"]})
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


async def _model_capacity(worker: WorkerProcess) -> dict:
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=10) as client:
        return (await client.get("/capacity")).json()["models"][0]


async def _until(worker: WorkerProcess, check, timeout_s: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll /capacity without blocking the event loop the requests under test run on."""
    async def holds() -> bool:
        return bool(check(await _model_capacity(worker)))

    return await eventually(holds, timeout_s=timeout_s)


def _rejections(worker: WorkerProcess) -> float:
    text = httpx.get(f"{worker.base_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("worker_admission_rejections_total{") and f'model="{MODEL}"' in line)


async def _burst(worker: WorkerProcess, key: str, count: int, max_tokens: int, stream: bool = False
                 ) -> list[tuple[int, dict[str, str], list[str]]]:
    headers = {"authorization": f"Bearer {key}"}

    async def one(client: httpx.AsyncClient) -> tuple[int, dict[str, str], list[str]]:
        body = chat_body(MODEL, max_tokens, stream=stream)
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            lines = [line async for line in response.aiter_lines()]
            return response.status_code, dict(response.headers), lines

    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(one(client) for _ in range(count)))


async def test_a_burst_of_four_batches_at_an_idle_model_is_served_without_refusals(worker: WorkerProcess) -> None:
    key = new_key(worker)
    before = _rejections(worker)
    results = await _burst(worker, key, 4 * SEQS, max_tokens=5, stream=True)
    assert [status for status, _, _ in results] == [200] * (4 * SEQS)
    for _, _, lines in results:
        assert_finished_normally(lines)
    assert _rejections(worker) == before
    queued = [int(headers.get("x-worker-queue-wait-ms", "0")) for _, headers, _ in results]
    assert sum(wait > 0 for wait in queued) >= SEQS  # most of the burst waited in the worker, not refused
    assert await _until(worker, lambda model: model["queue"]["depth"] == 0 and model["replicas"][0]["in_flight"] == 0)


async def test_a_client_that_leaves_while_queued_never_reaches_the_engine(worker: WorkerProcess) -> None:
    key = new_key(worker)
    headers = {"authorization": f"Bearer {key}"}
    [port] = worker.engine_ports()

    def engine_prompt_tokens() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:prompt_tokens_total"))
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=SEQS + 1)) as client:
        # Fill every batch slot with long streams, then queue one request with a prompt of its own size.
        holders = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(MODEL, 150),
                                                   headers=headers)) for _ in range(SEQS)]
        assert await _until(worker, lambda model: model["replicas"][0]["in_flight"] == SEQS)
        before = engine_prompt_tokens()
        long_prompt = {"model": MODEL, "max_tokens": 5,
                       "messages": [{"role": "user", "content": " ".join(["queued"] * 1000)}]}
        leaving = asyncio.create_task(client.post("/v1/chat/completions", json=long_prompt, headers=headers))
        assert await _until(worker, lambda model: model["queue"]["depth"] == 1)
        leaving.cancel()  # the client hangs up while its request is queued
        await asyncio.gather(leaving, return_exceptions=True)
        assert await _until(worker, lambda model: model["queue"]["depth"] == 0)
        results = await asyncio.gather(*holders)
    assert all(response.status_code == 200 for response in results)
    # The engine prefilled the eight holders (already counted) and nothing of the 1,000-word prompt.
    assert engine_prompt_tokens() - before < 1000
    assert await _until(worker, lambda model: model["replicas"][0]["in_flight"] == 0)


async def test_one_accounts_backlog_does_not_hold_back_anothers_first_request(worker: WorkerProcess) -> None:
    big, small = new_key(worker), new_key(worker)
    finished: list[str] = []

    async def one(client: httpx.AsyncClient, key: str, name: str) -> int:
        response = await client.post("/v1/chat/completions", json=chat_body(MODEL, 60),
                                     headers={"authorization": f"Bearer {key}"})
        finished.append(name)
        return response.status_code

    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=64)) as client:
        backlog = [asyncio.create_task(one(client, big, "big")) for _ in range(5 * SEQS)]
        assert await _until(worker, lambda model: model["queue"]["depth"] >= 2 * SEQS)
        first = asyncio.create_task(one(client, small, "small"))
        statuses = await asyncio.gather(*backlog, first)
    assert set(statuses) == {200}
    # Queued behind 2+ batches of the backlog, the small account's request went at the next free slot:
    # it finished with the batch after the one running when it arrived, not after the backlog.
    assert finished.index("small") < 2 * SEQS + 1


@pytest.mark.parametrize("processes", [1, 3], ids=["one-process", "three-gateway-processes"])
async def test_overload_is_shed_with_429_before_any_byte_and_no_5xx(tmp_path: Path, processes: int) -> None:
    proc = _start(tmp_path, processes, ttft_objective_s=1.0)
    try:
        key = new_key(proc)
        # 48 streams of 60 tokens (~0.6 s each, 8 at a time): ~3.6 s of work against a 1 s objective.
        results = await _burst(proc, key, 6 * SEQS, max_tokens=60, stream=True)
    finally:
        proc.stop()
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and 429 in statuses
    assert set(statuses) <= {200, 429}
    for status, headers, lines in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert lines and '"rate_limit_exceeded"' in lines[0]  # a JSON error body, not an event stream
            assert not any(line.startswith("data: ") for line in lines)
        else:
            assert_finished_normally(lines)


@pytest.mark.parametrize("processes", [1, 3], ids=["one-process", "three-gateway-processes"])
async def test_sigterm_serves_or_refuses_whats_queued_within_the_grace_period(tmp_path: Path, processes: int) -> None:
    proc = _start(tmp_path, processes)
    key = new_key(proc)
    try:
        burst = asyncio.create_task(_burst(proc, key, 3 * SEQS, max_tokens=30, stream=True))
        assert await _until(proc, lambda model: model["queue"]["depth"] > 0)
        proc.process.send_signal(signal.SIGTERM)
        results = await burst
        assert proc.process.wait(timeout=30) == 0
    finally:
        proc.stop()
    for status, headers, lines in results:
        assert status in (200, 503), status
        if status == 200:
            assert_finished_normally(lines)
        else:
            assert headers["retry-after"]
