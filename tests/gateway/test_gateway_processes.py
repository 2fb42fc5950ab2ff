"""Several gateway processes (`worker.gateway_processes`): relays serve the port, the worker process decides.

Every request here reaches a relay process (the worker process has no TCP listener of its own then); the
tests check that what must hold across processes does: admission's in-flight limit, per-key rate limits,
the ledger and metrics, interruptions, and that a relay's death loses nothing but its connections.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from tests.support.worker_process import (
    WorkerProcess,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
    wait_until,
)

CHAT = "acme/chat"
LIMITED = "acme/limited"
PROCESSES = 3
ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _start(tmp_path: Path, *, auth: bool, **worker: object) -> WorkerProcess:
    config = {
        "worker": {"id": "relayed-worker", "gateway_processes": PROCESSES, "restart_backoff_initial_s": 0.5,
                   **worker},
        "models": [
            fast_mock_model(CHAT, mock={"step_base_ms": 5.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0}),
            # Two requests at a time at most; 20 ms per token keeps an admitted stream open for a while.
            # No queue in the worker either: a third request is refused at once, whichever process takes it.
            fast_mock_model(LIMITED, admission={"max_in_flight": 2, "max_queued": 0},
                            mock={"step_base_ms": 20.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0}),
        ],
    }
    env = {"WORKER_AUTH": "true" if auth else "false", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = start_worker(tmp_path, config, env=env)

    def every_relay_started() -> bool:
        return len(proc.gateway_processes()) == PROCESSES

    return ready_or_stopped(proc, every_relay_started)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = _start(tmp_path_factory.mktemp("relayed"), auth=True)
    try:
        yield proc
    finally:
        proc.stop()


def new_key(worker: WorkerProcess, **limits: object) -> str:
    account = httpx.post(f"{worker.base_url}/admin/accounts", headers=ADMIN,
                         json={"name": "acme", "initial_balance_usd": "5"})
    assert account.status_code == 201, account.text
    key = httpx.post(f"{worker.base_url}/admin/keys", headers=ADMIN,
                     json={"account_id": account.json()["data"]["id"], **limits})
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


def metric(worker: WorkerProcess, name: str) -> dict[str, float]:
    """label set -> value for one metric family (an empty label set is "")."""
    values = {}
    for line in httpx.get(f"{worker.base_url}/metrics").text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match:
            values[match.group(1) or ""] = float(match.group(2))
    return values


def requests_by_process(worker: WorkerProcess) -> dict[str, float]:
    return metric(worker, "worker_gateway_process_requests_total")


def body(model: str = CHAT, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, **extra}


def post(worker: WorkerProcess, api_key: str | None, payload: dict[str, object]) -> tuple[httpx.Response, str]:
    """One request on a connection of its own; also says which gateway process took it."""
    before = requests_by_process(worker)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=worker.base_url, headers=headers, timeout=30) as client:
        response = client.post("/v1/chat/completions", json=payload)
        response.read()
    after = requests_by_process(worker)
    [process] = [label for label, count in after.items() if count != before.get(label)]
    return response, process


def stream_events(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_requests_are_relayed_by_every_process_metered_and_recorded(worker: WorkerProcess) -> None:
    api_key = new_key(worker)
    costs: dict[str, int] = {}
    processes = set()
    for i in range(12):
        headers = {"Authorization": f"Bearer {api_key}"}
        with httpx.Client(base_url=worker.base_url, headers=headers, timeout=30) as client:
            if i % 2:
                with client.stream("POST", "/v1/chat/completions",
                                   json=body(stream=True, stream_options={"include_usage": True})) as response:
                    assert response.status_code == 200
                    events = stream_events(response)
                assert events[-1] == "data: [DONE]"
                usage = orjson.loads(events[-2][len("data: "):])["usage"]
            else:
                response = client.post("/v1/chat/completions", json=body())
                assert response.status_code == 200, response.text
                usage = response.json()["usage"]
        assert usage["completion_tokens"] == 6
        assert usage["cost"] == (usage["prompt_tokens"] * 1 + 6 * 2) / 1_000_000
        assert response.headers["x-worker-replica"] == "acme-chat-0"
        assert response.headers["x-worker-id"] == "relayed-worker"
        costs[response.headers["x-request-id"]] = round(usage["cost"] * 1_000_000)

    log = worker.log()
    for request_id in costs:
        [line] = [line for line in log.splitlines() if f'"request_id":"{request_id}"' in line
                  and '"msg":"request"' in line]
        logged = orjson.loads(line)
        processes.add(logged["gateway_process"])
        assert 0 < logged["admit_ms"] <= logged["ttft_ms"] <= logged["duration_ms"]
    assert processes <= set(range(PROCESSES)) and len(processes) >= 2
    # Every request was relayed (the worker process does not listen on the port itself).
    assert sum(requests_by_process(worker).values()) >= 12

    # The rest of the API is passed through to the worker process, from any of them.
    for _ in range(6):
        with httpx.Client(base_url=worker.base_url) as client:
            assert client.get("/health/ready").json()["status"] == "ready"
            assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {CHAT, LIMITED}
            records = client.get("/v1/usage", headers={"x-api-key": api_key}).json()["data"]
    assert {r["request_id"]: r["cost_micro"] for r in records} == costs
    assert {r["outcome"] for r in records} == {"ok"}
    assert metric(worker, "worker_gateway_process_up") == {f'process="{i}"': 1.0 for i in range(PROCESSES)}
    cpu = metric(worker, "worker_gateway_process_cpu_seconds_total")
    assert set(cpu) == {f'process="{i}"' for i in range(PROCESSES)} and all(value > 0 for value in cpu.values())


def test_admission_limit_holds_across_processes(worker: WorkerProcess) -> None:
    api_key = new_key(worker)
    long_stream = body(LIMITED, max_tokens=450, stream=True)  # 9 s
    admitted: list[httpx.Response] = []
    clients = []
    try:
        for _ in range(2):
            client = httpx.Client(base_url=worker.base_url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=30)
            clients.append(client)
            response = client.send(client.build_request("POST", "/v1/chat/completions", json=long_stream),
                                   stream=True)
            assert response.status_code == 200
            admitted.append(response)
        # While both run, every process refuses a third, whichever takes the connection.
        refused_by: set[str] = set()
        for _ in range(40):
            response, process = post(worker, api_key, body(LIMITED))
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(response.headers["retry-after"]) >= 1
            refused_by.add(process)
            if len(refused_by) == PROCESSES:
                break
        assert len(refused_by) == PROCESSES
        assert sum(metric(worker, "worker_gateway_process_in_flight").values()) == 2
        assert all(next(response.iter_lines()).startswith("data: ") for response in admitted)
    finally:  # the clients go away mid-stream
        for response in admitted:
            response.close()
        for client in clients:
            client.close()
    # Their leases were released in the worker process when the relays saw the clients go.
    assert wait_until(lambda: metric(worker, "worker_replica_in_flight").get(
        'model="acme/limited",replica="acme-limited-0"') == 0.0)
    assert post(worker, api_key, body(LIMITED))[0].status_code == 200


def test_rate_limit_of_a_key_holds_across_processes(worker: WorkerProcess) -> None:
    api_key = new_key(worker, requests_per_minute=3)
    served = [post(worker, api_key, body())[0].status_code for _ in range(3)]
    assert served == [200, 200, 200]
    refused_by: set[str] = set()
    for _ in range(40):
        response, process = post(worker, api_key, body())
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert "per minute for this API key" in response.json()["error"]["message"]
        refused_by.add(process)
        if len(refused_by) == PROCESSES:
            break
    assert len(refused_by) == PROCESSES


def _ledger_outcome(db: Path, request_id: str) -> tuple[str, int] | None:
    with sqlite3.connect(db) as connection:
        row = connection.execute("SELECT outcome, status_code FROM ledger WHERE request_id = ?",
                                 (request_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def test_a_killed_gateway_process_is_replaced_and_its_request_recorded_as_failed(tmp_path: Path) -> None:
    proc = _start(tmp_path, auth=False)
    try:
        request_id = "relayed-stream-1"
        started = threading.Event()
        outcome: list[BaseException | None] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{proc.base_url}/v1/chat/completions", timeout=60,
                                  json=body(LIMITED, max_tokens=400, stream=True),
                                  headers={"x-request-id": request_id}) as r:
                    assert r.status_code == 200
                    for _ in r.iter_lines():
                        started.set()
                outcome.append(None)
            except httpx.HTTPError as error:
                outcome.append(error)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        old = proc.gateway_processes()
        for relay in old:
            relay.send_signal(signal.SIGKILL)
        reader.join(30)
        assert outcome and isinstance(outcome[0], httpx.HTTPError)  # its connection went with the process

        # New processes serve the port; the failed request was recorded and its lease released.
        assert wait_until(lambda: len(proc.gateway_processes()) == PROCESSES
                          and not {p.pid for p in proc.gateway_processes()} & {p.pid for p in old})
        proc.wait_ready(timeout_s=30)
        db = tmp_path / "ledger.db"
        assert wait_until(lambda: _ledger_outcome(db, request_id) is not None)
        assert _ledger_outcome(db, request_id) == ("upstream_failed", 502)
        [logged] = [orjson.loads(line) for line in proc.log().splitlines()
                    if f'"request_id":"{request_id}"' in line and '"msg":"request"' in line]
        assert logged["error"] == "the gateway process relaying the request exited"
        assert wait_until(lambda: metric(proc, "worker_replica_in_flight").get(
            'model="acme/limited",replica="acme-limited-0"') == 0.0)
        assert sum(metric(proc, "worker_gateway_process_restarts_total").values()) >= PROCESSES
        assert "gateway process exited; starting it again" in proc.log()
        assert post(proc, None, body())[0].status_code == 200
    finally:
        proc.stop()


def test_drain_interrupts_relayed_streams_and_stops_every_process(tmp_path: Path) -> None:
    proc = _start(tmp_path, auth=False, drain_grace_s=0.5)
    relays = proc.gateway_processes()
    children = proc.descendants()

    async def stream_through_shutdown() -> list[str]:
        async with (httpx.AsyncClient(base_url=proc.base_url, timeout=60) as client,
                    client.stream("POST", "/v1/chat/completions",
                                  json=body(LIMITED, max_tokens=400, stream=True)) as response):
            assert response.status_code == 200
            events: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        proc.process.send_signal(signal.SIGTERM)
            return events

    try:
        events = asyncio.run(stream_through_shutdown())
        assert events[-1] == "data: [DONE]"
        error_chunk = orjson.loads(events[-2][len("data: "):])
        assert error_chunk["choices"][0]["finish_reason"] == "error"
        assert error_chunk["error"]["message"] == "the worker is shutting down"
        assert proc.process.wait(timeout=60) == 0
    finally:
        proc.stop()
    assert relays and wait_until(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children), timeout_s=30)
    assert '"outcome":"upstream_failed"' in proc.log() or '"outcome":"engine_error"' in proc.log()


def test_sigkill_of_the_worker_ends_its_gateway_processes(tmp_path: Path) -> None:
    proc = _start(tmp_path, auth=False)
    children = proc.descendants()
    assert len(proc.gateway_processes()) == PROCESSES
    proc.stop(signal.SIGKILL)
    assert wait_until(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children), timeout_s=30)
