"""The admin API and the key holder's API, in process through httpx's ASGI transport."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from tests.billing.support import bearer, fake_replica, make_context, make_request, provenance_for
from worker.api.billing import build_admin_router, build_key_router
from worker.billing.keys import hash_api_key
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore
from worker.gateway.context import RequestContext, Usage
from worker.gateway.errors import ApiError

ADMIN_TOKEN = "admin-secret-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def build_app(service: BillingService, admin_token: SecretStr | None = None) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> Response:
        return error.to_response()

    app.include_router(build_key_router(service.keys, service.store))
    app.include_router(build_admin_router(service.store, admin_token))
    return app


@pytest.fixture
async def http(store: LedgerStore) -> AsyncIterator[tuple[httpx.AsyncClient, BillingService]]:
    service = BillingService(
        store=store,
        worker_id="worker-1",
        auth_required=True,
        provenance=provenance_for,
    )
    transport = httpx.ASGITransport(app=build_app(service, SecretStr(ADMIN_TOKEN)))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        yield client, service


async def test_admin_api_is_disabled_without_a_token(store: LedgerStore) -> None:
    service = BillingService(store=store, worker_id="worker-1", auth_required=True, provenance=provenance_for)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(service)), base_url="http://worker"
    ) as client:
        response = await client.get("/admin/keys", headers=ADMIN)
    assert response.status_code == 503
    assert "admin API disabled" in response.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}])
async def test_admin_api_needs_the_right_token(
    http: tuple[httpx.AsyncClient, BillingService], headers: dict[str, str]
) -> None:
    client, _ = http
    response = await client.post("/admin/accounts", json={"name": "acme"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_accounts_keys_and_revocation(
    http: tuple[httpx.AsyncClient, BillingService], store: LedgerStore
) -> None:
    client, _ = http
    created = await client.post(
        "/admin/accounts", json={"name": "acme", "initial_balance_usd": "10.5"}, headers=ADMIN
    )
    assert created.status_code == 201
    account = created.json()["data"]
    assert (account["balance_usd"], account["balance_micro"]) == ("10.500000", 10_500_000)

    topped = await client.post(
        f"/admin/accounts/{account['id']}/topup", json={"amount_usd": 0.1}, headers=ADMIN
    )
    assert topped.json()["data"]["balance_micro"] == 10_600_000  # 0.1 as a JSON number stays exactly 0.1
    assert (
        await client.post("/admin/accounts/acct_missing/topup", json={"amount_usd": "1"}, headers=ADMIN)
    ).status_code == 404
    assert (
        await client.post(
            f"/admin/accounts/{account['id']}/topup", json={"amount_usd": "0.0000001"}, headers=ADMIN
        )
    ).status_code == 422

    issued = await client.post(
        "/admin/keys",
        headers=ADMIN,
        json={
            "account_id": account["id"],
            "name": "prod",
            "allowed_models": ["acme/chat"],
            "requests_per_minute": 60,
            "monthly_spend_cap_usd": "5",
            "expires_in_days": 30,
        },
    )
    assert issued.status_code == 201
    body = issued.json()
    plaintext, key = body["key"], body["data"]
    assert plaintext.startswith(key["prefix"]) and key["monthly_spend_cap_usd"] == "5.000000"
    assert key["allowed_models"] == ["acme/chat"] and key["expires_at"] is not None
    stored = await store.get_key(key["id"])
    assert stored is not None and stored.key_hash == hash_api_key(plaintext)

    listing = await client.get("/admin/keys", headers=ADMIN)
    assert [k["id"] for k in listing.json()["data"]] == [key["id"]]
    assert plaintext not in listing.text and stored.key_hash not in listing.text
    assert (
        await client.post("/admin/keys", headers=ADMIN, json={"account_id": "acct_missing"})
    ).status_code == 404

    assert (await client.get("/v1/key", headers=bearer(plaintext))).status_code == 200
    revoked = await client.post(f"/admin/keys/{key['id']}/revoke", headers=ADMIN)
    assert revoked.json()["data"]["revoked_at"] is not None
    response = await client.get("/v1/key", headers=bearer(plaintext))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert (await client.post("/admin/keys/key_missing/revoke", headers=ADMIN)).status_code == 404


async def serve_requests(
    service: BillingService, plaintext: str, count: int, *, request_id: str | None = None
) -> list[RequestContext]:
    served = []
    for i in range(count):
        ctx = make_context(request_id=request_id)
        await service.before_request(ctx, make_request(bearer(plaintext)))
        ctx.replica = fake_replica()
        ctx.status_code, ctx.finish_reason = 200, "stop"
        ctx.usage = Usage(prompt_tokens=10, completion_tokens=i + 1)
        await service.finalize(ctx)
        served.append(ctx)
    return served


async def new_key(client: httpx.AsyncClient) -> str:
    account = (
        await client.post("/admin/accounts", json={"name": "acme", "initial_balance_usd": "1"}, headers=ADMIN)
    ).json()["data"]
    return (await client.post("/admin/keys", json={"account_id": account["id"]}, headers=ADMIN)).json()["key"]


async def test_key_holder_sees_own_key_and_usage_in_pages(
    http: tuple[httpx.AsyncClient, BillingService],
) -> None:
    client, service = http
    account = (
        await client.post("/admin/accounts", json={"name": "acme", "initial_balance_usd": "1"}, headers=ADMIN)
    ).json()["data"]
    first = (
        await client.post(
            "/admin/keys", json={"account_id": account["id"], "tokens_per_minute": 10_000}, headers=ADMIN
        )
    ).json()
    second = (await client.post("/admin/keys", json={"account_id": account["id"]}, headers=ADMIN)).json()
    mine = [ctx.request_id for ctx in await serve_requests(service, first["key"], 5)]
    await serve_requests(service, second["key"], 2)

    own = (await client.get("/v1/key", headers={"x-api-key": first["key"]})).json()["data"]
    assert own["id"] == first["data"]["id"] and own["tokens_per_minute"] == 10_000
    spent = sum(10 + 2 * (i + 1) for i in range(5))
    assert own["spend_this_month_micro"] == spent
    assert own["balance_micro"] == 1_000_000 - spent - sum(10 + 2 * (i + 1) for i in range(2))
    assert "key_hash" not in own

    page = (await client.get("/v1/usage?limit=2", headers=bearer(first["key"]))).json()
    seen = [r["request_id"] for r in page["data"]]
    while page["next_cursor"]:
        page = (
            await client.get(f"/v1/usage?limit=2&cursor={page['next_cursor']}", headers=bearer(first["key"]))
        ).json()
        seen += [r["request_id"] for r in page["data"]]
    assert seen == list(reversed(mine))  # newest first, nobody else's
    record = (await client.get("/v1/usage?limit=1", headers=bearer(first["key"]))).json()["data"][0]
    assert record["cost_usd"] == "0.000020" and record["cost_micro"] == 20

    other_model = await client.get("/v1/usage?model=acme/other", headers=bearer(first["key"]))
    assert other_model.json()["data"] == []
    future = await client.get("/v1/usage?since=2999-01-01T00:00:00Z", headers=bearer(first["key"]))
    assert future.json()["data"] == []
    assert (await client.get("/v1/usage?cursor=abc", headers=bearer(first["key"]))).status_code == 400
    assert (await client.get("/v1/usage")).status_code == 401


@pytest.mark.parametrize("export_format", ["csv", "jsonl"])
async def test_usage_export(http: tuple[httpx.AsyncClient, BillingService], export_format: str) -> None:
    client, service = http
    account = (
        await client.post("/admin/accounts", json={"name": "acme", "initial_balance_usd": "1"}, headers=ADMIN)
    ).json()["data"]
    key = (await client.post("/admin/keys", json={"account_id": account["id"]}, headers=ADMIN)).json()
    served = await serve_requests(service, key["key"], 3)
    ids = [ctx.request_id for ctx in served]
    record_ids = [ctx.record_id for ctx in served]

    response = await client.get(f"/admin/usage/export?format={export_format}", headers=ADMIN)
    assert response.status_code == 200
    assert "attachment" in response.headers["content-disposition"]
    if export_format == "csv":
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [row["request_id"] for row in rows] == ids
        assert [row["record_id"] for row in rows] == record_ids
        assert rows[0]["gpu_uuids"] == "GPU-0,GPU-1" and rows[0]["cost_usd"] == "0.000012"
    else:
        rows = [orjson.loads(line) for line in response.text.splitlines()]
        assert [row["request_id"] for row in rows] == ids
        assert [row["record_id"] for row in rows] == record_ids
        assert rows[2]["completion_tokens"] == 3 and rows[2]["key_id"] == key["data"]["id"]
    assert (await client.get("/admin/usage/export?format=xml", headers=ADMIN)).status_code == 422
    assert (await client.get("/admin/usage/export")).status_code == 401


async def test_records_are_found_by_the_request_id_the_client_saw(
    http: tuple[httpx.AsyncClient, BillingService],
) -> None:
    client, service = http
    mine, theirs = await new_key(client), await new_key(client)
    reused = await serve_requests(service, mine, 2, request_id="client-reused")
    await serve_requests(service, mine, 1)
    other = await serve_requests(service, theirs, 1, request_id="client-reused")

    own = (await client.get("/v1/usage?request_id=client-reused", headers=bearer(mine))).json()["data"]
    assert [r["record_id"] for r in own] == [ctx.record_id for ctx in reversed(reused)]
    assert {r["request_id"] for r in own} == {"client-reused"}

    exported = await client.get("/admin/usage/export?format=jsonl&request_id=client-reused", headers=ADMIN)
    rows = [orjson.loads(line) for line in exported.text.splitlines()]
    assert [row["record_id"] for row in rows] == [ctx.record_id for ctx in (*reused, *other)]
