"""Billing's HTTP routes. `/admin/*`: accounts, keys, usage export and the audit trail for the operator, behind
a bearer admin token (worker/api/admin_auth.py). `GET /v1/key` and `GET /v1/usage`: what a key holder may
see of their own key and requests. Lists page newest first: a page's `next_cursor` is the seq of its last item,
validated on the way back in.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Annotated[..., Path()]` and
# `Depends(current_key)` annotations.
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import StreamingResponse

from worker.api.admin_auth import AdminAccess, AdminChange, ChangeRecorder
from worker.api.billing_views import (
    AccountView,
    CreateAccountRequest,
    CreatedKey,
    CreateKeyRequest,
    KeyView,
    OwnKeyView,
    QueryText,
    TopUpRequest,
)
from worker.billing.audit import audit
from worker.billing.authentication import KeyAuthenticator
from worker.billing.export import MEDIA_TYPES, export_lines, record_json
from worker.billing.keys import open_account
from worker.billing.money import usd_to_micro
from worker.billing.store import BalanceLimitExceeded, LedgerStore, UnknownAccount
from worker.billing.store.records import MAX_BALANCE_USD, AdminAction, ApiKey, LedgerFilter, utc_month
from worker.gateway.errors import ApiError, api_error
from worker.refusals import InvalidKey

# Seqs are BIGINT (PostgreSQL) / INTEGER (SQLite): signed 64-bit.
MAX_SEQ = 2**63 - 1
MAX_PAGE = 500

# Documented with its pattern; checked by `cursor_value`, which answers a friendlier 400 than the pattern's.
Cursor = Annotated[
    str | None,
    Query(description="next_cursor of the previous page", json_schema_extra={"pattern": r"^[0-9]{1,19}$"}),
]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page, at most {MAX_PAGE}")]


AccountId = Annotated[QueryText, Path(description="an account id (acct_...)")]
KeyId = Annotated[QueryText, Path(description="a key id (key_...)")]


def audit_recorder(store: LedgerStore | None) -> ChangeRecorder:
    """Keeps each admin change in `store`'s audit table (None: the ledger is off, the log only)."""

    async def record(change: AdminChange) -> None:
        await audit(store, AdminAction(at=change.at, actor="admin", client=change.client,
                                       request_id=change.request_id, action=change.action, target=change.target,
                                       changes=change.changes))

    return record


def build_admin_router(store: LedgerStore, access: AdminAccess | SecretStr | None) -> APIRouter:
    """The billing admin routes; `access` is the worker's AdminAccess (or just the admin token)."""
    if not isinstance(access, AdminAccess):
        access = AdminAccess(access, recorder=audit_recorder(store))
    admin = access
    router = APIRouter(prefix="/admin", dependencies=[Depends(admin)], tags=["admin"])

    @router.post("/accounts", status_code=201)
    async def create_account(request: Request, body: CreateAccountRequest) -> dict[str, Any]:
        account = await open_account(store, body.name, usd_to_micro(body.initial_balance_usd))
        await admin.record(
            request,
            "account.create",
            account.id,
            {"name": account.name, "balance_micro": account.balance_micro},
        )
        return {"data": AccountView.of(account)}

    @router.get("/accounts")
    async def list_accounts() -> dict[str, Any]:
        return {"object": "list", "data": [AccountView.of(a) for a in await store.list_accounts()]}

    @router.get("/accounts/{account_id}")
    async def get_account(account_id: AccountId) -> dict[str, Any]:
        account = await store.get_account(account_id)
        if account is None:
            raise ApiError(404, f"no account '{account_id}'", code="account_not_found")
        return {"data": AccountView.of(account)}

    @router.post("/accounts/{account_id}/topup")
    async def top_up(request: Request, account_id: AccountId, body: TopUpRequest) -> dict[str, Any]:
        amount = usd_to_micro(body.amount_usd)
        try:
            account = await store.top_up(account_id, amount)
        except UnknownAccount:
            raise ApiError(404, f"no account '{account_id}'", code="account_not_found") from None
        except BalanceLimitExceeded:
            raise ApiError(
                400, f"the balance after this top-up would exceed {MAX_BALANCE_USD} USD", param="amount_usd"
            ) from None
        await admin.record(
            request,
            "account.topup",
            account.id,
            {"amount_micro": amount, "balance_micro": account.balance_micro},
        )
        return {"data": AccountView.of(account)}

    @router.post("/keys", status_code=201)
    async def create_key(request: Request, body: CreateKeyRequest) -> CreatedKey:
        try:
            issued = await body.issue(store)
        except UnknownAccount:
            raise ApiError(
                404, f"no account '{body.account_id}'", code="account_not_found", param="account_id"
            ) from None
        view = KeyView.of(issued.key, _month())
        await admin.record(request, "key.create", issued.key.id, view.settings())
        return CreatedKey(key=issued.plaintext.get_secret_value(), data=view)

    @router.get("/keys")
    async def list_keys(account_id: Annotated[QueryText | None, Query()] = None) -> dict[str, Any]:
        month = _month()
        return {"object": "list", "data": [KeyView.of(k, month) for k in await store.list_keys(account_id)]}

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: KeyId) -> dict[str, Any]:
        key = await store.revoke_key(key_id, time.time())
        if key is None:
            raise ApiError(404, f"no key '{key_id}'", code="key_not_found")
        view = KeyView.of(key, _month())
        revoked_at = key.revoked_at.isoformat() if key.revoked_at else None
        await admin.record(
            request, "key.revoke", key.id, {"account_id": key.account_id, "revoked_at": revoked_at}
        )
        return {"data": view}

    @router.get("/audit")
    async def audit_trail(limit: PageSize = 50, cursor: Cursor = None) -> dict[str, Any]:
        """Admin changes, newest first: account creation, top-ups, key creation and revocation, drains."""
        records = await store.query_admin_audit(limit=limit, cursor=cursor_value(cursor))
        return {
            "object": "list",
            "data": [record.view() for record in records],
            "next_cursor": next_cursor([record.seq for record in records], limit),
        }

    @router.get("/usage/export")
    async def export_usage(
        format: Literal["csv", "jsonl"] = "jsonl",
        since: datetime | None = None,
        until: datetime | None = None,
        model: Annotated[QueryText | None, Query()] = None,
        account_id: Annotated[QueryText | None, Query()] = None,
        key_id: Annotated[QueryText | None, Query()] = None,
        request_id: Annotated[QueryText | None, Query()] = None,
    ) -> StreamingResponse:
        where = LedgerFilter(
            since=since,
            until=until,
            model=model,
            account_id=account_id,
            key_id=key_id,
            request_id=request_id,
        )
        filename = f"usage-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.{format}"
        return StreamingResponse(
            export_lines(store, where, format),
            media_type=MEDIA_TYPES[format],
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    return router


def _month() -> str:
    return utc_month(time.time())


def build_key_router(keys: KeyAuthenticator, store: LedgerStore) -> APIRouter:
    router = APIRouter(tags=["key"])

    async def current_key(request: Request) -> ApiKey:
        try:
            return await keys.authenticate(request.headers)
        except InvalidKey as refusal:
            raise api_error(refusal) from None

    OwnKey = Annotated[ApiKey, Depends(current_key)]

    @router.get("/v1/key")
    async def own_key(key: OwnKey) -> dict[str, Any]:
        account = await store.get_account(key.account_id)
        if account is None:  # keys are never orphaned; this would be a damaged database
            raise ApiError(500, "the account of this key is missing")
        return {"data": OwnKeyView.of_key(key, account, utc_month(time.time()))}

    @router.get("/v1/usage")
    async def own_usage(
        key: OwnKey,
        limit: PageSize = 50,
        cursor: Cursor = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model: Annotated[QueryText | None, Query()] = None,
        request_id: Annotated[
            QueryText | None, Query(description="only records with this x-request-id")
        ] = None,
    ) -> dict[str, Any]:
        where = LedgerFilter(key_id=key.id, model=model, since=since, until=until, request_id=request_id)
        records = await store.query_ledger(
            where, limit=limit, order="desc", cursor=cursor_value(cursor)
        )
        return {
            "object": "list",
            "data": [record_json(r) for r in records],
            "next_cursor": next_cursor([r.seq or 0 for r in records], limit),
        }

    return router


def cursor_value(cursor: str | None) -> int | None:
    """The seq a cursor stands for; 400 naming `cursor` for anything no page could have given."""
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > MAX_SEQ:
        raise ApiError(400, "invalid cursor: pass next_cursor from the previous page", param="cursor")
    return int(cursor)


def next_cursor(seqs: list[int], limit: int) -> str | None:
    """The cursor of the next page, None when this page was the last."""
    return str(seqs[-1]) if len(seqs) == limit else None
