"""Fuzzing the admin routes from the worker's OpenAPI document, with the admin token, against `worker serve`
on SQLite and on PostgreSQL (which refuses more: NUL in text, integers past int64).

Schemathesis generates path parameters, query strings and bodies from the document (valid ones, and ones
that break it); routes on an account or a key are also fuzzed on a real one, so top-ups and revocations
reach the database. No request may get a 5xx.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase

from tests.billing.support import fresh_database
from tests.support.worker_process import WorkerProcess, fast_mock_model, ready_or_stopped, start_worker

ADMIN_TOKEN = "admin-fuzz-token-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Per operation and kind of data (valid, schema-breaking), and again on a real account or key where the
# path names one: about 300 requests per database.
EXAMPLES_PER_RUN = 15


@dataclass
class FuzzRun:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


def fuzz_admin_routes(
    base_url: str, account_id: str, key_id: str, examples: int = EXAMPLES_PER_RUN
) -> FuzzRun:
    """Send generated requests to every `/admin/*` operation the worker documents; count what came back."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    run = FuzzRun()
    real_ids = {"account_id": account_id, "key_id": key_id}

    def send_generated(
        session: requests.Session,
        operation: schemathesis.APIOperation,
        mode: schemathesis.GenerationMode,
        on_real_ids: bool,
    ) -> None:
        named = {p.name for p in operation.path_parameters}
        path_parameters = {name: real_ids[name] for name in named} if on_real_ids else None

        # Deterministic (derandomized, no example database): CI sends the same requests each run.
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def send(case: schemathesis.Case) -> None:
            if on_real_ids and isinstance(case.body, dict) and "account_id" in case.body:
                case.body["account_id"] = account_id
            response = case.call(base_url=base_url, session=session, headers=ADMIN, timeout=30)
            run.statuses[(operation.label, response.status_code)] += 1
            if response.status_code >= 500:
                run.server_errors.append(
                    f"{operation.label} ({mode.value}) -> {response.status_code}: {response.text[:300]}\n"
                    f"{case.as_curl_command(headers=ADMIN)}"[:2000]
                )

        try:
            send()
        except hypothesis.errors.Unsatisfiable:
            # Nothing in the operation can be made invalid (no parameters, no body): nothing to send.
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label

    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if not operation.path.startswith("/admin/"):
                continue
            names_an_id = bool(operation.path_parameters) or operation.label == "POST /admin/keys"
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                send_generated(session, operation, mode, on_real_ids=False)
                if names_an_id:
                    send_generated(session, operation, mode, on_real_ids=True)
    return run


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp_path = tmp_path_factory.mktemp(f"admin-fuzz-{request.param}")
    database = fresh_database(request.param, tmp_path)
    db_url = asyncio.run(database.__aenter__())  # each step opens and closes its own connection
    proc = ready_or_stopped(
        start_worker(
            tmp_path,
            {"worker": {"id": "fuzz"}, "models": [fast_mock_model("acme/chat")]},
            env={"WORKER_AUTH": "true", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN, "WORKER_DB_URL": db_url},
        )
    )
    try:
        yield proc
    finally:
        proc.stop()
        asyncio.run(database.__aexit__(None, None, None))


def test_fuzzed_admin_requests_get_no_server_error(worker: WorkerProcess) -> None:
    account = httpx.post(f"{worker.base_url}/admin/accounts", headers=ADMIN, json={"name": "fuzz"})
    key = httpx.post(
        f"{worker.base_url}/admin/keys", headers=ADMIN, json={"account_id": account.json()["data"]["id"]}
    )
    run = fuzz_admin_routes(worker.base_url, account.json()["data"]["id"], key.json()["data"]["id"])

    summary = f"{run.requests} requests; statuses: {dict(sorted(run.statuses.items()))}"
    print(summary)
    assert not run.server_errors, (
        "\n\n".join(run.server_errors[:10]) + f"\n\nworker log:\n{worker.log()[-6000:]}"
    )
    operations = {label for label, _ in run.statuses}
    assert {
        "POST /admin/accounts",
        "POST /admin/accounts/{account_id}/topup",
        "POST /admin/keys",
        "GET /admin/audit",
        "GET /admin/usage/export",
        "POST /admin/drain",
    } <= operations, summary
    # Generated values were both taken and refused, on the routes that change money and keys.
    for label in ("POST /admin/accounts", "POST /admin/accounts/{account_id}/topup", "POST /admin/keys"):
        assert run.statuses[(label, 400)] > 0, summary
        assert run.statuses[(label, 200)] + run.statuses[(label, 201)] > 0, summary
    # Every change that was taken is in the audit trail.
    changes = sum(
        count
        for (label, status), count in run.statuses.items()
        if label.startswith("POST") and status in (200, 201)
    )
    audited, cursor = 0, None
    while True:
        page = httpx.get(
            f"{worker.base_url}/admin/audit",
            headers=ADMIN,
            params={"limit": 500, **({"cursor": cursor} if cursor else {})},
        ).json()
        audited += len(page["data"])
        if (cursor := page["next_cursor"]) is None:
            break
    assert audited == changes + 2  # and the account and key made above
