"""Fuzzing the inference routes from their OpenAPI document, with a funded key, against `worker serve`.

Schemathesis generates request bodies from the document the worker serves (valid ones, and ones that
break the schema), and every answer is checked against that document. After the run nothing may be
left behind: no request in flight, no balance held, and exactly one ledger record for each request
that got past authentication.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.worker_process import (
    WorkerProcess,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
    wait_until,
)

CHAT = "acme/chat-small"
EMBED = "acme/embed-small"
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Per route and per kind of data (valid, schema-breaking): at most 6 x 60 requests in all.
EXAMPLES_PER_RUN = 60
# With a rate limit on the key, the billing hook puts these on every answer once it has checked the key:
# a request got past authentication exactly when its answer carries them.
AUTHENTICATED_HEADER = "x-ratelimit-limit-requests"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass(frozen=True)
class Answer:
    route: str
    mode: str
    status: int
    request_id: str
    authenticated: bool


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    # A short context bounds the work one generated request can ask for (n x max_tokens), and so the run.
    engine = {"engine_args": {"max_model_len": 128, "max_num_seqs": 16},
              "mock": {"step_base_ms": 0.2, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0}}
    config = {
        "worker": {"id": "fuzz-worker", "max_body_bytes": 65536},
        "models": [fast_mock_model(CHAT, **engine), fast_mock_model(EMBED, task="embed", **engine)],
    }
    proc = start_worker(tmp_path_factory.mktemp("fuzz-worker"), config,
                        env={"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN})
    ready_or_stopped(proc)
    try:
        yield proc
    finally:
        proc.stop()


def funded_key(worker: WorkerProcess) -> tuple[str, str]:
    """(account id, API key): enough money that a worst case never runs out, a limit nobody reaches."""
    account = httpx.post(f"{worker.base_url}/admin/accounts", headers=ADMIN,
                         json={"name": "fuzz", "initial_balance_usd": "10000"})
    assert account.status_code == 201, account.text
    account_id = account.json()["data"]["id"]
    key = httpx.post(f"{worker.base_url}/admin/keys", headers=ADMIN,
                     json={"account_id": account_id, "requests_per_minute": 1_000_000})
    assert key.status_code == 201, key.text
    return account_id, key.json()["key"]


def fuzz(worker: WorkerProcess, api_key: str) -> tuple[list[Answer], list[str]]:
    """Every answer to the generated requests, and a description of each check that failed."""
    schema = schemathesis.openapi.from_url(f"{worker.base_url}/openapi.json")
    auth = {"Authorization": f"Bearer {api_key}"}
    answers: list[Answer] = []
    failures: list[str] = []

    def run(session: requests.Session, route: str, mode: schemathesis.GenerationMode) -> None:
        # Deterministic (derandomized, no example database) so CI sends the same requests each run;
        # nothing raises inside, so there is no shrinking: every failure is collected instead.
        @hypothesis.settings(max_examples=EXAMPLES_PER_RUN, deadline=None, derandomize=True, database=None,
                             phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @hypothesis.given(case=schema[route]["POST"].as_strategy(generation_mode=mode))
        def send(case: schemathesis.Case) -> None:
            response = case.call(base_url=worker.base_url, session=session, headers=auth, timeout=60)
            # Schemathesis keeps each header's values as a list, under its lower-case name.
            request_id = response.headers.get("x-request-id", [""])[0]
            answers.append(Answer(route, mode.value, response.status_code, request_id,
                                  AUTHENTICATED_HEADER in response.headers))
            try:
                case.validate_response(response, checks=CHECKS, headers=auth)
            except (Failure, FailureGroup) as failure:
                failures.append(f"{route} ({mode.value}) -> {response.status_code}: {response.text[:500]}\n"
                                f"{failure}\n{case.as_curl_command(headers=auth)}"[:3000])

        send()

    with requests.Session() as session:
        for route in ROUTES:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                run(session, route, mode)
    return answers, failures


def capacity_in_flight(worker: WorkerProcess) -> int:
    document = httpx.get(f"{worker.base_url}/capacity").json()
    return sum(replica["in_flight"] for model in document["models"] for replica in model["replicas"])


def reservations_held(worker: WorkerProcess) -> float:
    for line in httpx.get(f"{worker.base_url}/metrics").text.splitlines():
        if line.startswith("worker_balance_reservations_held "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no worker_balance_reservations_held")


def account_reserved_micro(worker: WorkerProcess, account_id: str) -> int:
    response = httpx.get(f"{worker.base_url}/admin/accounts/{account_id}", headers=ADMIN)
    return int(response.json()["data"]["reserved_micro"])


def test_fuzzed_inference_requests_get_no_server_error_and_leave_nothing_behind(
    worker: WorkerProcess,
) -> None:
    account_id, api_key = funded_key(worker)
    answers, failures = fuzz(worker, api_key)

    by_route = Counter((answer.route, answer.mode) for answer in answers)
    statuses = Counter((answer.route, answer.status) for answer in answers)
    summary = f"requests per route and mode: {dict(by_route)}; statuses: {dict(sorted(statuses.items()))}"
    print(summary)
    assert len(by_route) == 2 * len(ROUTES), summary
    server_errors = [failure for failure in failures if " -> 5" in failure.split("\n", 1)[0]]
    assert not server_errors, "\n\n".join(server_errors[:10]) + f"\n\nworker log:\n{worker.log()[-6000:]}"
    assert not failures, "\n\n".join(failures[:10])
    # Every route both served generated requests and refused some: the engine's path and the refusals ran.
    for route in ROUTES:
        assert statuses[(route, 200)] > 0, summary
        assert sum(count for (where, status), count in statuses.items() if where == route and status >= 400), summary

    # Nothing left in flight or held once the answers are in (finalizing may end a moment after the last byte).
    assert wait_until(lambda: capacity_in_flight(worker) == 0, timeout_s=15), "requests still in flight"
    assert wait_until(lambda: reservations_held(worker) == 0, timeout_s=15), "balance holds still held"
    assert account_reserved_micro(worker, account_id) == 0

    # A clean stop commits every ledger record; each authenticated request has exactly one.
    assert worker.stop() == 0
    database = Path(worker.env["WORKER_DB_URL"].removeprefix("sqlite:///"))
    with sqlite3.connect(database) as db:
        recorded = Counter(request_id for (request_id,) in db.execute("SELECT request_id FROM ledger"))
    authenticated = Counter(answer.request_id for answer in answers if answer.authenticated)
    assert sum(authenticated.values()) > 0
    assert recorded == authenticated, (
        f"records without an authenticated answer: {sorted(recorded - authenticated)[:10]}; "
        f"authenticated answers without one record: {sorted(authenticated - recorded)[:10]}"
    )
