"""`worker keys ...` and `worker usage export` against a SQLite billing database."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
from pathlib import Path
from uuid import uuid4

import orjson
import pytest

from tests.billing.support import ledger_entry
from worker.billing.keys import hash_api_key, looks_like_api_key
from worker.billing.store import open_store
from worker.billing.store.records import ApiKey, LedgerFilter
from worker.cli import keys, usage


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="worker")
    commands = parser.add_subparsers(dest="command", required=True)
    keys.register(commands)
    usage.register(commands)
    args = parser.parse_args(list(argv))
    return args.handler(args)


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("WORKER_DB_URL", url)
    return url


def new_account(capsys: pytest.CaptureFixture[str], balance: str = "2.5") -> str:
    assert run("keys", "create-account", "acme", "--balance-usd", balance) == 0
    return capsys.readouterr().out.split()[1]


def test_account_key_topup_revoke(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    account_id = new_account(capsys)
    assert account_id.startswith("acct_")

    assert (
        run(
            "keys",
            "create",
            "--account",
            account_id,
            "--name",
            "prod",
            "--models",
            "a, b",
            "--rpm",
            "30",
            "--monthly-cap-usd",
            "1.25",
            "--expires-in-days",
            "7",
        )
        == 0
    )
    captured = capsys.readouterr()
    plaintext = captured.out.strip()
    assert looks_like_api_key(plaintext) and "shown only now" in captured.err

    async def stored_key() -> ApiKey | None:
        store = await open_store(db_url)
        try:
            return await store.find_key_by_hash(hash_api_key(plaintext))
        finally:
            await store.close()

    key = asyncio.run(stored_key())
    assert key is not None
    assert key.limits.allowed_models == ("a", "b") and key.limits.monthly_spend_cap_micro == 1_250_000
    assert key.expires_at is not None

    assert run("keys", "list", "--json") == 0
    listed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [k["id"] for k in listed] == [key.id]
    assert plaintext not in orjson.dumps(listed).decode()

    assert run("keys", "topup", account_id, "0.75") == 0
    assert "3.250000 USD" in capsys.readouterr().out
    assert run("keys", "accounts", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["balance_micro"] == 3_250_000

    assert run("keys", "revoke", key.id) == 0
    assert run("keys", "list") == 0
    assert "revoked" in capsys.readouterr().out


def test_errors_are_reported_with_a_failing_status(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("keys", "create", "--account", "acct_missing") == 1
    assert "no account" in capsys.readouterr().err
    assert run("keys", "revoke", "key_missing") == 1
    assert run("keys", "topup", "acct_missing", "1") == 1
    account_id = new_account(capsys)
    with pytest.raises(SystemExit, match="micro-USD"):
        run("keys", "topup", account_id, "0.0000001")
    with pytest.raises(SystemExit, match="greater than 0"):
        run("keys", "topup", account_id, "-1")


def test_create_with_json_output(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    account_id = new_account(capsys)
    assert run("keys", "create", "--account", account_id, "--byok", "--json") == 0
    created = orjson.loads(capsys.readouterr().out)
    assert looks_like_api_key(created["key"]) and created["data"]["is_byok"] is True


def test_a_key_created_with_a_priority_keeps_it(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    account_id = new_account(capsys)
    assert run("keys", "create", "--account", account_id, "--priority", "5", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["data"]["priority"] == 5
    with pytest.raises(SystemExit, match="--priority"):
        run("keys", "create", "--account", account_id, "--priority", "11")


def test_usage_export(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"rec-{uuid4().hex}" for _ in range(3)]

    async def fill() -> int:
        store = await open_store(db_url)
        try:
            for record_id in ids:
                await store.settle(ledger_entry(record_id, request_id="client-reused"))
            return await store.count_ledger(LedgerFilter())
        finally:
            await store.close()

    assert asyncio.run(fill()) == 3
    assert run("usage", "export") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["record_id"], row["request_id"]) for row in rows] == [(i, "client-reused") for i in ids]

    out = tmp_path / "usage.jsonl"
    assert (
        run(
            "usage",
            "export",
            "--format",
            "jsonl",
            "--model",
            "acme/chat",
            "--since",
            "2000-01-01",
            "--output",
            str(out),
        )
        == 0
    )
    assert "exported 3 records" in capsys.readouterr().err
    assert [orjson.loads(line)["record_id"] for line in out.read_text().splitlines()] == ids
    assert run("usage", "export", "--model", "acme/other", "--format", "jsonl") == 0
    assert capsys.readouterr().out == ""
