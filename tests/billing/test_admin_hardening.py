"""Hostile values on the key holder's and the admin's routes, the admin token's rules, the audit trail, the
ledger files' modes and how client errors are logged.

The HTTP tests use the worker's own app (WorkerNode: its error handlers and its one AdminAccess for the
billing and the capacity admin routes) in process, on SQLite and PostgreSQL; the log and start-up tests run
`worker serve` as a process and read its JSON log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.billing.support import bearer, ledger_entry, make_key, provenance_for
from tests.support.worker_process import (
    WorkerProcess,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
    wait_until,
    write_config,
)
from worker.api.admin_auth import ADMIN_FAILURES_PER_MINUTE
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore, open_store
from worker.billing.store.records import MAX_BALANCE_MICRO
from worker.cli import keys
from worker.config import ConfigError, NodeConfig, Settings
from worker.gateway.client_address import RELAYED_CLIENT_HEADER, client_address, with_relayed_client
from worker.node import WorkerNode

ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INT64_MAX = 2**63 - 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def node(store: LedgerStore, tmp_path: Path) -> WorkerNode:
    """The worker's app with its billing routes on `store`; no engine is started (no admin route needs
    one)."""
    config = NodeConfig.model_validate(
        {"worker": {"id": "admin-node"}, "models": [fast_mock_model("acme/chat")]}
    )
    settings = Settings(auth=True, db_url=f"sqlite:///{tmp_path / 'unused.db'}", admin_token=ADMIN_TOKEN)
    worker = WorkerNode(config, settings, gpu_count=0)
    worker.admin_access.clock = FakeClock()
    worker.mount_billing_routes(
        BillingService(store=store, worker_id="admin-node", auth_required=True, provenance=provenance_for)
    )
    return worker


def client_for(node: WorkerNode, address: str = "10.1.2.3") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=node.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://worker")


@pytest.fixture
async def admin(node: WorkerNode) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(node) as client:
        yield client


def refused_param(response: httpx.Response) -> str | None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["param"]


async def new_account(admin: httpx.AsyncClient, balance: str = "10") -> str:
    created = await admin.post(
        "/admin/accounts", json={"name": "acme", "initial_balance_usd": balance}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    return created.json()["data"]["id"]


# Query values a key holder controls.
async def test_usage_cursor_out_of_range_is_a_400_naming_cursor(
    admin: httpx.AsyncClient, store: LedgerStore
) -> None:
    key = await make_key(store)
    for cursor in ["9223372036854775808", "²", "-1", "1e3", "abc", "99999999999999999999", ""]:
        response = await admin.get("/v1/usage", params={"cursor": cursor}, headers=bearer(key.plaintext))
        assert refused_param(response) == "cursor", cursor


async def test_usage_pages_up_to_the_largest_cursor(admin: httpx.AsyncClient, store: LedgerStore) -> None:
    key = await make_key(store)
    for number in range(3):
        await store.settle(ledger_entry(f"rec-{number}", key=key.key))
    newest_first = await admin.get(
        "/v1/usage", params={"cursor": str(INT64_MAX)}, headers=bearer(key.plaintext)
    )
    assert newest_first.status_code == 200
    assert [r["record_id"] for r in newest_first.json()["data"]] == ["rec-2", "rec-1", "rec-0"]
    page = await admin.get("/v1/usage", params={"limit": 2}, headers=bearer(key.plaintext))
    rest = await admin.get(
        "/v1/usage", params={"limit": 2, "cursor": page.json()["next_cursor"]}, headers=bearer(key.plaintext)
    )
    assert [r["record_id"] for r in rest.json()["data"]] == ["rec-0"] and rest.json()["next_cursor"] is None


async def test_usage_filters_out_of_range_are_400s(admin: httpx.AsyncClient, store: LedgerStore) -> None:
    key = await make_key(store)
    for params, param in [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": str(2**64)}, "limit"),
        ({"model": "acme\x00chat"}, "model"),
        ({"request_id": "x" * 201}, "request_id"),
        ({"since": "not-a-date"}, "since"),
    ]:
        response = await admin.get("/v1/usage", params=params, headers=bearer(key.plaintext))
        assert refused_param(response) == param, params


# Admin values.
ACCOUNT_REFUSALS = [
    ({"name": "acme", "initial_balance_usd": "-1"}, "initial_balance_usd"),
    ({"name": "acme", "initial_balance_usd": -0.000001}, "initial_balance_usd"),
    ({"name": "acme", "initial_balance_usd": "1000000000.000001"}, "initial_balance_usd"),
    ({"name": "acme", "initial_balance_usd": "1e999999"}, "initial_balance_usd"),
    ({"name": "acme", "initial_balance_usd": 1e300}, "initial_balance_usd"),
    ({"name": "acme", "initial_balance_usd": "NaN"}, "initial_balance_usd"),
    ({"name": "ac\x00me"}, "name"),
    ({"name": "\ud800"}, "name"),
    ({"name": ""}, "name"),
]


async def test_account_values_out_of_range_are_400s_naming_the_field(
    admin: httpx.AsyncClient, store: LedgerStore
) -> None:
    for body, param in ACCOUNT_REFUSALS:
        # orjson refuses a lone surrogate; json.dumps writes it as the escape a hostile client would send.
        response = await admin.post(
            "/admin/accounts", content=json.dumps(body), headers={**ADMIN, "content-type": "application/json"}
        )
        assert refused_param(response) == param, body
    assert await store.list_accounts() == []


async def test_the_largest_balance_is_accepted_and_a_top_up_past_it_refused(
    admin: httpx.AsyncClient, store: LedgerStore
) -> None:
    account_id = await new_account(admin, balance="999999999")
    topped = await admin.post(f"/admin/accounts/{account_id}/topup", json={"amount_usd": "1"}, headers=ADMIN)
    assert topped.status_code == 200 and topped.json()["data"]["balance_micro"] == MAX_BALANCE_MICRO
    over = await admin.post(
        f"/admin/accounts/{account_id}/topup", json={"amount_usd": "0.000001"}, headers=ADMIN
    )
    assert refused_param(over) == "amount_usd"
    account = await store.get_account(account_id)
    assert account is not None and account.balance_micro == MAX_BALANCE_MICRO


async def test_top_up_values_out_of_range_are_400s(admin: httpx.AsyncClient, store: LedgerStore) -> None:
    account_id = await new_account(admin)
    for amount in ["0", "-5", 0, "1000000000.5", "1e19", 9.3e18, "0.0000001", True, None, [1]]:
        response = await admin.post(
            f"/admin/accounts/{account_id}/topup", json={"amount_usd": amount}, headers=ADMIN
        )
        assert refused_param(response) == "amount_usd", amount
    account = await store.get_account(account_id)
    assert account is not None and account.balance_micro == 10_000_000


KEY_REFUSALS = [
    ({"requests_per_minute": 2**31}, "requests_per_minute"),
    ({"requests_per_minute": 0}, "requests_per_minute"),
    ({"tokens_per_minute": 2**63}, "tokens_per_minute"),
    ({"monthly_spend_cap_usd": "1e10"}, "monthly_spend_cap_usd"),
    ({"monthly_spend_cap_usd": "-1"}, "monthly_spend_cap_usd"),
    ({"expires_in_days": 1e9}, "expires_in_days"),
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at"),
    ({"expires_at": "0001-01-01T00:00:00+14:00"}, "expires_at"),
    ({"allowed_models": ["acme/chat", "bad\x00"]}, "allowed_models.1"),
    ({"allowed_models": ["m"] * 1001}, "allowed_models"),
    ({"name": "x\x00"}, "name"),
    ({"account_id": ""}, "account_id"),
]


async def test_key_values_out_of_range_are_400s_naming_the_field(
    admin: httpx.AsyncClient, store: LedgerStore
) -> None:
    account_id = await new_account(admin)
    for fields, param in KEY_REFUSALS:
        response = await admin.post("/admin/keys", json={"account_id": account_id, **fields}, headers=ADMIN)
        assert refused_param(response) == param, fields
    assert await store.list_keys() == []


async def test_key_limits_at_their_bounds_are_stored_and_read_back(
    admin: httpx.AsyncClient, store: LedgerStore
) -> None:
    account_id = await new_account(admin)
    response = await admin.post(
        "/admin/keys",
        headers=ADMIN,
        json={
            "account_id": account_id,
            "requests_per_minute": 2**31 - 1,
            "tokens_per_minute": 2**31 - 1,
            "monthly_spend_cap_usd": "1000000000",
            "expires_at": "8999-12-31T00:00:00Z",
        },
    )
    assert response.status_code == 201, response.text
    [key] = (await admin.get("/admin/keys", headers=ADMIN)).json()["data"]
    assert key["requests_per_minute"] == 2**31 - 1 and key["monthly_spend_cap_usd"] == "1000000000.000000"
    assert key["expires_at"].startswith("8999-12-31")


async def test_admin_path_and_query_values_are_checked(admin: httpx.AsyncClient) -> None:
    for method, path, param in [
        ("GET", "/admin/accounts/acct%00x", "account_id"),
        ("POST", "/admin/keys/key%00x/revoke", "key_id"),
        ("GET", "/admin/keys?account_id=a%00", "account_id"),
        ("GET", "/admin/usage/export?model=%00", "model"),
        ("GET", "/admin/audit?cursor=9223372036854775808", "cursor"),
        ("GET", "/admin/audit?limit=0", "limit"),
        ("GET", "/admin/audit?cursor=%C2%B2", "cursor"),
    ]:
        assert refused_param(await admin.request(method, path, headers=ADMIN)) == param, path


# The audit trail.
async def test_every_admin_action_is_audited_and_readable_in_pages(
    node: WorkerNode, admin: httpx.AsyncClient, store: LedgerStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.billing.audit")
    created = await admin.post(
        "/admin/accounts", json={"name": "acme", "initial_balance_usd": "2"}, headers=ADMIN
    )
    account_id = created.json()["data"]["id"]
    await admin.post(f"/admin/accounts/{account_id}/topup", json={"amount_usd": "0.5"}, headers=ADMIN)
    issued = await admin.post(
        "/admin/keys",
        json={"account_id": account_id, "name": "prod", "requests_per_minute": 60},
        headers=ADMIN,
    )
    key_id, plaintext = issued.json()["data"]["id"], issued.json()["key"]
    revoked = await admin.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN)
    assert (await admin.post("/admin/drain", headers=ADMIN)).status_code == 200
    assert (await admin.post("/admin/undrain", headers=ADMIN)).status_code == 200
    # Reading changes nothing and is not audited.
    await admin.get("/admin/accounts", headers=ADMIN)

    trail = (await admin.get("/admin/audit", headers=ADMIN)).json()
    assert [(r["action"], r["target"]) for r in trail["data"]] == [
        ("worker.undrain", None),
        ("worker.drain", None),
        ("key.revoke", key_id),
        ("key.create", key_id),
        ("account.topup", account_id),
        ("account.create", account_id),
    ]
    assert trail["next_cursor"] is None
    by_action = {r["action"]: r for r in trail["data"]}
    assert all(r["actor"] == "admin" and r["client"] == "10.1.2.3" for r in trail["data"])
    assert by_action["account.create"]["request_id"] == created.headers["x-request-id"]
    assert by_action["account.create"]["changes"] == {"name": "acme", "balance_micro": 2_000_000}
    assert by_action["account.topup"]["changes"] == {"amount_micro": 500_000, "balance_micro": 2_500_000}
    assert by_action["key.create"]["changes"]["requests_per_minute"] == 60
    assert by_action["key.create"]["changes"]["account_id"] == account_id
    assert by_action["key.revoke"]["changes"]["revoked_at"] == revoked.json()["data"]["revoked_at"].replace(
        "Z", "+00:00"
    )
    assert by_action["worker.drain"]["changes"] == {"draining": True, "in_flight": 0}
    assert plaintext not in orjson.dumps(trail).decode()  # the key itself is shown once, never kept

    first = (await admin.get("/admin/audit", params={"limit": 4}, headers=ADMIN)).json()
    rest = (
        await admin.get("/admin/audit", params={"limit": 4, "cursor": first["next_cursor"]}, headers=ADMIN)
    ).json()
    assert [r["seq"] for r in first["data"] + rest["data"]] == [r["seq"] for r in trail["data"]]
    assert rest["next_cursor"] is None

    logged = [r for r in caplog.records if r.getMessage() == "admin action"]
    assert [r.action for r in logged] == [  # type: ignore[attr-defined]
        "account.create",
        "account.topup",
        "key.create",
        "key.revoke",
        "worker.drain",
        "worker.undrain",
    ]
    assert all(plaintext not in str(vars(r)) for r in caplog.records)


async def test_the_audit_table_is_append_only(
    store: LedgerStore, admin: httpx.AsyncClient, db_url: str
) -> None:
    await new_account(admin)
    if db_url.startswith("sqlite"):
        import sqlite3

        connection = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        try:
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                connection.execute("DELETE FROM admin_audit")
        finally:
            connection.close()
    else:
        import asyncpg

        connection = await asyncpg.connect(db_url)
        try:
            with pytest.raises(asyncpg.PostgresError, match="append-only"):
                await connection.execute("UPDATE admin_audit SET actor = 'nobody'")
        finally:
            await connection.close()
    assert len(await store.query_admin_audit(limit=10)) == 1


def run_cli(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="worker")
    keys.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


async def test_cli_actions_are_audited_with_actor_cli(
    db_url: str, store: LedgerStore, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    def cli(*argv: str) -> str:
        assert run_cli(*argv, "--db-url", db_url) == 0
        return capsys.readouterr().out

    account_id = (
        await asyncio.to_thread(cli, "keys", "create-account", "acme", "--balance-usd", "3")
    ).split()[1]
    await asyncio.to_thread(cli, "keys", "topup", account_id, "2")
    key = orjson.loads(
        await asyncio.to_thread(cli, "keys", "create", "--account", account_id, "--rpm", "5", "--json")
    )
    await asyncio.to_thread(cli, "keys", "revoke", key["data"]["id"])
    with pytest.raises(SystemExit, match="--balance-usd"):
        await asyncio.to_thread(cli, "keys", "create-account", "acme", "--balance-usd", "-1")
    with pytest.raises(SystemExit, match="--rpm"):
        await asyncio.to_thread(cli, "keys", "create", "--account", account_id, "--rpm", str(2**31))

    trail = await store.query_admin_audit(limit=10)
    assert [(r.actor, r.action) for r in trail] == [
        ("cli", "key.revoke"),
        ("cli", "key.create"),
        ("cli", "account.topup"),
        ("cli", "account.create"),
    ]
    assert trail[2].changes == {"amount_micro": 2_000_000, "balance_micro": 5_000_000}
    assert trail[1].changes["requests_per_minute"] == 5 and trail[0].client is None


# Failed admin attempts.
async def test_failed_admin_attempts_are_limited_per_address_and_logged(
    node: WorkerNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    wrong = {"Authorization": "Bearer guess-" + "x" * 40}
    async with client_for(node, "10.9.9.9") as attacker, client_for(node, "10.1.1.1") as operator:
        for _ in range(ADMIN_FAILURES_PER_MINUTE):
            assert (await attacker.get("/admin/accounts", headers=wrong)).status_code == 401
        refused = await attacker.get("/admin/accounts", headers=wrong)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        # While limited the address is refused unread, the right token included; other addresses are not.
        assert (await attacker.post("/admin/drain", headers=ADMIN)).status_code == 429
        assert (await operator.get("/admin/accounts", headers=ADMIN)).status_code == 200
        assert (
            await operator.post("/admin/undrain", headers={"Authorization": "Bearer nope"})
        ).status_code == 401

        node.admin_access.clock.now += 60 / ADMIN_FAILURES_PER_MINUTE  # type: ignore[attr-defined]
        assert (await attacker.get("/admin/accounts", headers=ADMIN)).status_code == 200

    refusals = [r for r in caplog.records if r.getMessage() == "admin token refused"]
    assert len(refusals) == ADMIN_FAILURES_PER_MINUTE + 1
    assert {(r.client, r.path) for r in refusals} == {  # type: ignore[attr-defined]
        ("10.9.9.9", "/admin/accounts"),
        ("10.1.1.1", "/admin/undrain"),
    }
    assert any(
        "refused for a while" in r.getMessage() and r.client == "10.9.9.9"  # type: ignore[attr-defined]
        for r in caplog.records
    )
    everything_logged = " ".join(str(vars(r)) for r in caplog.records)
    assert "guess-" not in everything_logged and ADMIN_TOKEN not in everything_logged


async def test_an_admin_500_is_logged_once(
    admin: httpx.AsyncClient,
    store: LedgerStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(store, "list_accounts", broken)
    caplog.set_level(logging.INFO)
    # The transport raises what the app raises: a server would log that a second time.
    response = await admin.get("/admin/accounts", headers=ADMIN)
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_server_error"
    [logged] = [r for r in caplog.records if r.exc_info]
    assert logged.getMessage() == "unhandled error" and logged.request_id == response.headers["x-request-id"]  # type: ignore[attr-defined]


def test_a_relayed_request_has_the_address_the_relay_saw_never_one_the_client_claimed() -> None:
    claimed = (RELAYED_CLIENT_HEADER, b"10.0.0.1")
    at_the_relay = {"client": ("203.0.113.9", 5555), "headers": [claimed, (b"accept", b"*/*")]}
    passed_on = with_relayed_client(at_the_relay, at_the_relay["headers"])
    assert passed_on == [(b"accept", b"*/*"), (RELAYED_CLIENT_HEADER, b"203.0.113.9")]
    # The worker process reads the header only on its internal Unix socket, where there is no peer address.
    assert client_address({"client": None, "headers": passed_on}) == "203.0.113.9"
    assert client_address({"client": ("198.51.100.7", 1), "headers": [claimed]}) == "198.51.100.7"


def test_admin_requests_through_relay_processes_keep_their_client_address(tmp_path: Path) -> None:
    config = {"worker": {"id": "w1", "gateway_processes": 2}, "models": [fast_mock_model("acme/chat")]}
    proc = ready_or_stopped(
        start_worker(tmp_path, config, env={"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN})
    )
    try:
        # Each attempt claims another address: were the claim believed, none would ever be limited.
        statuses = []
        for attempt in range(5 * ADMIN_FAILURES_PER_MINUTE):
            claimed = {RELAYED_CLIENT_HEADER.decode(): f"10.0.0.{attempt}", "Authorization": "Bearer no"}
            statuses.append(httpx.get(f"{proc.base_url}/admin/accounts", headers=claimed).status_code)
            if statuses[-1] == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {401}
        refusals = [line for line in log_lines(proc, 0) if line["msg"] == "admin token refused"]
        assert len(refusals) == len(statuses) - 1 and {line["client"] for line in refusals} == {"127.0.0.1"}
    finally:
        proc.stop()


# The admin token.
@pytest.mark.parametrize("token", ["tok-9f8e", "Q" * 31])
def test_a_short_admin_token_is_a_start_up_error_naming_the_variable(token: str) -> None:
    with pytest.raises(ConfigError, match=r"WORKER_ADMIN_TOKEN: .*at least 32 characters") as refused:
        Settings.from_env(admin_token=token)
    assert token not in str(refused.value)


def test_admin_token_of_32_characters_or_blank() -> None:
    assert Settings.from_env(admin_token="b" * 32).admin_token is not None
    assert Settings.from_env(admin_token="  ").admin_token is None  # blanked out: the admin API is off


def test_worker_serve_refuses_a_short_admin_token(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "models.yaml", {"worker": {"id": "w"}, "models": [fast_mock_model("acme/chat")]}
    )
    token = "short-token-1234"
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--config", str(config), "--engine", "mock"],
        env={**os.environ, "WORKER_ADMIN_TOKEN": token, "WORKER_DB_URL": f"sqlite:///{tmp_path / 'l.db'}"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 2
    assert "WORKER_ADMIN_TOKEN" in completed.stderr and "at least 32 characters" in completed.stderr
    assert token not in completed.stderr + completed.stdout
    assert not (tmp_path / "l.db").exists()


# Ledger files.
@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual 022 umask, under which files were created 0644 before."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
async def test_ledger_files_are_private(tmp_path: Path) -> None:
    database = tmp_path / "billing" / "ledger.db"
    store = await open_store(f"sqlite:///{database}")
    try:
        await store.start_journal("worker-1")
        key = await make_key(store)
        settled = await store.settle_soon(ledger_entry("rec-1", key=key.key))
        journal = database.with_name("ledger.db.journal")
        # The record is in the journal until its batch is committed.
        journal_modes = [mode(f) for f in (journal / "worker-1").iterdir()]
        await settled
        assert journal_modes == [0o600]
        assert mode(database.parent) == 0o700
        assert {p.name: mode(p) for p in database.parent.iterdir()} == {
            "ledger.db": 0o600,
            "ledger.db-wal": 0o600,
            "ledger.db-shm": 0o600,
            "ledger.db.journal": 0o700,
        }
        assert mode(journal / "worker-1") == 0o700
    finally:
        await store.close()


@pytest.mark.usefixtures("open_umask")
async def test_ledger_files_created_open_by_an_older_worker_are_closed(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    store = await open_store(f"sqlite:///{database}")
    await make_key(store)
    await store.close()
    database.chmod(0o644)
    reopened = await open_store(f"sqlite:///{database}")
    try:
        assert mode(database) == 0o600
        assert mode(tmp_path) == stat.S_IMODE(tmp_path.stat().st_mode)  # a directory that was there stays
    finally:
        await reopened.close()


# How client errors are logged, by `worker serve` itself.
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """`worker serve` with keys and the admin token, its ledger where it goes by default (the working
    directory)."""
    tmp_path = tmp_path_factory.mktemp("served")
    env = {"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN, "WORKER_DB_URL": Settings().db_url}
    proc = ready_or_stopped(
        start_worker(tmp_path, {"worker": {"id": "w1"}, "models": [fast_mock_model("acme/chat")]}, env=env)
    )
    yield proc
    proc.stop()


def log_lines(proc: WorkerProcess, after: int) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in proc.log()[after:].splitlines() if line.startswith("{")]


def send_raw(proc: WorkerProcess, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)  # the rest of the body never comes
        return connection.recv(65536)


# Two client errors that log one line each, used to mark the end of what another request logged.
MALFORMED_HEAD = b"GET /health/live HTTP/1.1\r\nhost: w\r\nno colon in this header\r\n\r\n"
MALFORMED_HEAD_LOGS = "Invalid HTTP request received."
SHORT_BODY = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: w\r\ncontent-type: application/json\r\n"
              b'content-length: 100\r\n\r\n{"model":')
SHORT_BODY_LOGS = "request body ended before its declared length"


def lines_after(proc: WorkerProcess, mark: int, predicate: Any) -> list[dict[str, Any]]:
    """The lines logged from `mark` once one matches `predicate`, up to a later request's: whatever the request
    logs after its first line (a duplicate, a traceback) is written before the worker serves the next one."""
    assert wait_until(lambda: any(predicate(line) for line in log_lines(proc, mark)), timeout_s=10)
    request, logged = (SHORT_BODY, SHORT_BODY_LOGS) if any(
        line["msg"] == MALFORMED_HEAD_LOGS for line in log_lines(proc, mark)) else (MALFORMED_HEAD, MALFORMED_HEAD_LOGS)
    send_raw(proc, request)
    assert wait_until(lambda: any(line["msg"] == logged for line in log_lines(proc, mark)), timeout_s=10)
    lines = log_lines(proc, mark)
    return lines[:next(i for i, line in enumerate(lines) if line["msg"] == logged)]


@pytest.mark.parametrize(
    "request_bytes",
    [
        SHORT_BODY,
        b"POST /admin/accounts HTTP/1.1\r\nhost: w\r\nauthorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b'\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"name":',
    ],
    ids=["inference", "admin"],
)
def test_a_body_shorter_than_its_length_is_logged_once_at_info(
    served: WorkerProcess, request_bytes: bytes
) -> None:
    mark = len(served.log())
    send_raw(served, request_bytes)
    lines = lines_after(served, mark, lambda line: "declared length" in line["msg"])
    assert [(line["level"], line["msg"]) for line in lines] == [
        ("info", "request body ended before its declared length")
    ]
    assert "exc" not in lines[0] and lines[0]["request_id"].startswith("req-")


def test_malformed_headers_are_logged_once_at_info(served: WorkerProcess) -> None:
    mark = len(served.log())
    answer = send_raw(served, MALFORMED_HEAD)
    assert answer.startswith(b"HTTP/1.1 400")
    lines = lines_after(served, mark, lambda line: "Invalid HTTP" in line["msg"])
    assert [(line["level"], line["msg"]) for line in lines] == [("info", "Invalid HTTP request received.")]


def test_wrong_admin_tokens_are_logged_with_address_and_path_only(served: WorkerProcess) -> None:
    mark = len(served.log())
    presented = "not-the-token-" + "z" * 30
    response = httpx.get(f"{served.base_url}/admin/audit", headers={"Authorization": f"Bearer {presented}"})
    assert response.status_code == 401
    lines = lines_after(served, mark, lambda line: line["msg"] == "admin token refused")
    [refusal] = [line for line in lines if line["msg"] == "admin token refused"]
    assert (
        refusal["level"] == "warning"
        and refusal["client"] == "127.0.0.1"
        and refusal["path"] == "/admin/audit"
    )
    assert presented not in served.log() and ADMIN_TOKEN not in served.log()


def test_the_default_ledger_is_private_in_the_working_directory(served: WorkerProcess) -> None:
    created = httpx.post(f"{served.base_url}/admin/accounts", json={"name": "acme"}, headers=ADMIN)
    assert created.status_code == 201
    workdir = served.log_path.parent
    ledger = {p.name: mode(p) for p in workdir.iterdir() if p.name.startswith("worker-ledger.db")}
    assert ledger == {
        "worker-ledger.db": 0o600,
        "worker-ledger.db-wal": 0o600,
        "worker-ledger.db-shm": 0o600,
        "worker-ledger.db.journal": 0o700,
    }
    assert {mode(p) for p in (workdir / "worker-ledger.db.journal").iterdir()} == {0o700}
    [audited] = httpx.get(f"{served.base_url}/admin/audit", headers=ADMIN).json()["data"]
    assert audited["action"] == "account.create" and audited["client"] == "127.0.0.1"
