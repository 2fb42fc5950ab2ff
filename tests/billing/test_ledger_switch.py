"""WORKER_LEDGER: off only without API keys, and then nothing is written."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.worker_process import fast_mock_model, start_worker
from worker.config import ConfigError, Settings

MODEL = "acme/unbilled"


def test_ledger_off_with_keys_on_is_refused_naming_both_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(ledger=False, auth=True)
    assert "WORKER_LEDGER" in str(caught.value) and "WORKER_AUTH" in str(caught.value)
    assert Settings.from_env(ledger=False, auth=False).ledger is False


def test_worker_with_ledger_off_and_keys_on_does_not_start(tmp_path: Path) -> None:
    worker = start_worker(tmp_path, {"worker": {"id": "switch"}, "models": [fast_mock_model(MODEL)]},
                          env={"WORKER_LEDGER": "false", "WORKER_AUTH": "true"})
    try:
        code = worker.process.wait(timeout=60)
    finally:
        worker.stop()
    assert code == 2
    assert "WORKER_LEDGER" in worker.log() and "WORKER_AUTH" in worker.log()
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.parametrize("ledger", [False, True])
def test_ledger_switch_decides_whether_requests_are_recorded(tmp_path: Path, ledger: bool) -> None:
    worker = start_worker(tmp_path, {"worker": {"id": "switch"}, "models": [fast_mock_model(MODEL)]},
                          env={"WORKER_LEDGER": str(ledger).lower()})
    try:
        worker.wait_ready()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        answer = httpx.post(f"{worker.base_url}/v1/chat/completions", json=body, timeout=30)
        streamed = httpx.post(f"{worker.base_url}/v1/chat/completions", timeout=30,
                              json={**body, "stream": True, "stream_options": {"include_usage": True}})
        usage_status = httpx.get(f"{worker.base_url}/v1/usage", timeout=10).status_code
    finally:
        assert worker.stop() == 0
    assert (tmp_path / "ledger.db").exists() is ledger
    assert usage_status == (404 if not ledger else 401)
    # Provenance and the cost are told to the client either way: they do not depend on the ledger.
    assert answer.status_code == 200 and streamed.status_code == 200
    for response in (answer, streamed):
        assert response.headers["x-worker-id"] == "switch"
        assert response.headers["x-worker-replica"] == f"{MODEL.replace('/', '-')}-0"
        assert response.headers["x-worker-engine-version"].startswith("mock")
    assert answer.json()["usage"]["cost"] == priced(answer.json()["usage"])
    final_usage = [orjson.loads(line[6:])["usage"] for line in streamed.text.splitlines()
                   if line.startswith("data: {") and '"usage":{' in line]
    assert final_usage and final_usage[-1]["cost"] == priced(final_usage[-1])


def priced(usage: dict[str, int]) -> float:
    """fast_mock_model's prices: 1 USD per million prompt tokens, 2 per million completion tokens."""
    return float(Decimal(usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1_000_000)
