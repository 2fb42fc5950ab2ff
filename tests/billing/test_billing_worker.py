"""Billing in a real `worker serve` process: the official OpenAI SDK's errors, costs, and a SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import psutil
import pytest

from tests.support.worker_process import WorkerProcess, fast_mock_model, ready_or_stopped, start_worker

CHAT = "acme/chat-small"
OTHER = "acme/chat-other"
SLOW = "acme/chat-slow"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def billed_worker(tmp_path: Path) -> WorkerProcess:
    config = {
        "worker": {"id": "billing-worker"},
        "models": [
            fast_mock_model(CHAT),
            fast_mock_model(OTHER),
            fast_mock_model(SLOW, mock={"step_base_ms": 50.0}),
        ],
    }
    proc = start_worker(
        tmp_path,
        config,
        env={"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN, "WORKER_DB_SYNCHRONOUS": "normal"},
    )
    return ready_or_stopped(proc)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = billed_worker(tmp_path_factory.mktemp("billed-worker"))
    try:
        yield proc
    finally:
        proc.stop()


def new_key(worker: WorkerProcess, balance_usd: str = "1", **limits: object) -> tuple[str, str, str]:
    """(account id, key id, API key)"""
    account = httpx.post(
        f"{worker.base_url}/admin/accounts",
        headers=ADMIN,
        json={"name": "acme", "initial_balance_usd": balance_usd},
    )
    assert account.status_code == 201, account.text
    account_id = account.json()["data"]["id"]
    key = httpx.post(
        f"{worker.base_url}/admin/keys", headers=ADMIN, json={"account_id": account_id, **limits}
    )
    assert key.status_code == 201, key.text
    return account_id, key.json()["data"]["id"], key.json()["key"]


def client(worker: WorkerProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key=api_key, max_retries=0)


def chat(sdk: openai.OpenAI, model: str = CHAT, **extra: object) -> object:
    return sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=8, **extra
    )


def balance_micro(worker: WorkerProcess, account_id: str) -> tuple[int, int]:
    data = httpx.get(f"{worker.base_url}/admin/accounts/{account_id}", headers=ADMIN).json()["data"]
    return data["balance_micro"], data["reserved_micro"]


def test_wrong_or_missing_key_is_an_authentication_error(worker: WorkerProcess) -> None:
    for api_key in ("not-a-key", "iow_" + "A" * 43):
        with pytest.raises(openai.AuthenticationError) as caught:
            chat(client(worker, api_key))
        assert caught.value.code == "invalid_api_key"
    response = httpx.post(
        f"{worker.base_url}/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 401
    assert response.headers["x-worker-id"] == "billing-worker"


def test_completion_reports_its_cost_and_is_charged_exactly(worker: WorkerProcess) -> None:
    account_id, key_id, api_key = new_key(worker)
    raw = chat(client(worker, api_key))
    completion = raw.parse()
    cost = completion.usage.model_extra["cost"]
    expected_micro = completion.usage.prompt_tokens * 1 + completion.usage.completion_tokens * 2
    assert round(cost * 1_000_000) == expected_micro
    assert raw.headers["x-worker-id"] == "billing-worker"
    assert balance_micro(worker, account_id) == (1_000_000 - expected_micro, 0)

    own = httpx.get(f"{worker.base_url}/v1/key", headers={"Authorization": f"Bearer {api_key}"}).json()[
        "data"
    ]
    assert own["id"] == key_id and own["spend_this_month_micro"] == expected_micro
    usage = httpx.get(f"{worker.base_url}/v1/usage", headers={"x-api-key": api_key}).json()["data"]
    assert [r["request_id"] for r in usage] == [raw.headers["x-request-id"]]
    assert usage[0]["replica_id"] == "acme-chat-small-0"


def test_a_reused_x_request_id_is_served_echoed_and_recorded_each_time(worker: WorkerProcess) -> None:
    account_id, _, api_key = new_key(worker)
    sdk = client(worker, api_key)
    request_id = f"client-{uuid.uuid4().hex}"
    raws = [chat(sdk, extra_headers={"x-request-id": request_id}) for _ in range(2)]
    assert [raw.headers["x-request-id"] for raw in raws] == [request_id, request_id]
    costs = [round(raw.parse().usage.model_extra["cost"] * 1_000_000) for raw in raws]
    assert balance_micro(worker, account_id) == (1_000_000 - sum(costs), 0)

    usage = httpx.get(
        f"{worker.base_url}/v1/usage", params={"request_id": request_id}, headers={"x-api-key": api_key}
    ).json()["data"]
    assert [r["request_id"] for r in usage] == [request_id, request_id]
    record_ids = {r["record_id"] for r in usage}
    assert len(record_ids) == 2 and request_id not in record_ids
    assert sorted(r["cost_micro"] for r in usage) == sorted(costs)


def test_without_auth_a_reused_x_request_id_is_recorded_each_time(tmp_path: Path) -> None:
    proc = start_worker(
        tmp_path,
        {"worker": {"id": "open-worker"}, "models": [fast_mock_model(CHAT)]},
        env={"WORKER_AUTH": "false", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN, "WORKER_DB_SYNCHRONOUS": "normal"},
    )
    try:
        proc.wait_ready()
        body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for _ in range(2):
            response = httpx.post(
                f"{proc.base_url}/v1/chat/completions", json=body, headers={"x-request-id": "client-reused"}
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == "client-reused"
        exported = httpx.get(
            f"{proc.base_url}/admin/usage/export",
            params={"format": "jsonl", "request_id": "client-reused"},
            headers=ADMIN,
        )
        assert exported.status_code == 200, exported.text
    finally:
        proc.stop()
    rows = [orjson.loads(line) for line in exported.text.splitlines()]
    expected = [("client-reused", None, 200)] * 2
    assert [(r["request_id"], r["key_id"], r["status_code"]) for r in rows] == expected
    assert len({r["record_id"] for r in rows}) == 2


def test_streamed_usage_carries_the_cost(worker: WorkerProcess) -> None:
    account_id, _, api_key = new_key(worker)
    stream = client(worker, api_key).chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    expected_micro = usage.prompt_tokens + 2 * usage.completion_tokens
    assert round(usage.model_extra["cost"] * 1_000_000) == expected_micro
    assert balance_micro(worker, account_id) == (1_000_000 - expected_micro, 0)


def test_model_outside_the_allow_list_is_permission_denied(worker: WorkerProcess) -> None:
    _, _, api_key = new_key(worker, allowed_models=[CHAT])
    chat(client(worker, api_key), CHAT)
    with pytest.raises(openai.PermissionDeniedError):
        chat(client(worker, api_key), OTHER)


def test_empty_balance_is_402_insufficient_quota(worker: WorkerProcess) -> None:
    account_id, _, api_key = new_key(worker, balance_usd="0.00001")
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client(worker, api_key))
    assert caught.value.status_code == 402 and caught.value.code == "insufficient_quota"
    assert balance_micro(worker, account_id) == (10, 0)


def test_rate_limit_is_a_rate_limit_error_with_headers(worker: WorkerProcess) -> None:
    _, _, api_key = new_key(worker, requests_per_minute=1)
    raw = chat(client(worker, api_key))
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client(worker, api_key))
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.response.headers["x-ratelimit-reset-requests"]


def test_revoked_key_is_refused_on_its_next_request(worker: WorkerProcess) -> None:
    _, key_id, api_key = new_key(worker)
    chat(client(worker, api_key))
    assert httpx.post(f"{worker.base_url}/admin/keys/{key_id}/revoke", headers=ADMIN).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        chat(client(worker, api_key))


def test_every_answered_request_survives_sigkill_and_held_money_is_released(tmp_path: Path) -> None:
    proc = billed_worker(tmp_path)
    children: list[psutil.Process] = []
    try:
        account_id, _, api_key = new_key(proc)
        sdk = client(proc, api_key)
        answered: dict[str, int] = {}
        for _ in range(15):
            raw = chat(sdk)
            usage = raw.parse().usage
            answered[raw.headers["x-request-id"]] = usage.prompt_tokens + 2 * usage.completion_tokens
        # A long stream is still running when the worker is killed: its reservation is left behind.
        with httpx.stream(
            "POST",
            f"{proc.base_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={
                "model": SLOW,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 400,
                "stream": True,
            },
        ) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            children = proc.descendants()
            proc.stop(signal.SIGKILL)
    finally:
        proc.stop()
        psutil.wait_procs(children, timeout=30)

    with sqlite3.connect(tmp_path / "ledger.db") as db:
        (reserved,) = db.execute("SELECT reserved_micro FROM accounts WHERE id = ?", (account_id,)).fetchone()
        committed = {row[0] for row in db.execute("SELECT request_id FROM ledger")}
    assert reserved > 0
    # What had not reached the database yet is in the worker's journal beside it.
    journaled = {
        orjson.loads(line)[1]
        for path in (tmp_path / "ledger.db.journal" / "billing-worker").glob("*.jsonl")
        for line in path.read_bytes().splitlines()
    }
    assert committed | journaled == set(answered)

    restarted = billed_worker(tmp_path)
    try:
        balance = 1_000_000 - sum(answered.values())
        assert balance_micro(restarted, account_id) == (balance, 0)
        own = httpx.get(f"{restarted.base_url}/v1/key", headers={"x-api-key": api_key}).json()["data"]
        assert own["balance_micro"] == balance
    finally:
        restarted.stop()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        recorded = db.execute("SELECT request_id, cost_micro FROM ledger").fetchall()
    assert sorted(recorded) == sorted(answered.items())  # each answered request once, at its cost
