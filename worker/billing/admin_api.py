"""`/admin/*`: accounts, keys and usage export for the operator, behind a bearer admin token."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import StreamingResponse

from worker.billing.export import MEDIA_TYPES, export_lines
from worker.billing.issuing import issue_key, open_account
from worker.billing.money import usd_to_micro
from worker.billing.records import KeyLimits, LedgerFilter, utc_month
from worker.billing.store import LedgerStore, UnknownAccount
from worker.billing.views import (
    AccountView,
    CreateAccountRequest,
    CreatedKey,
    CreateKeyRequest,
    KeyView,
    TopUpRequest,
)
from worker.gateway.errors import ApiError


def require_admin_token(admin_token: SecretStr | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency admitting only `Authorization: Bearer <admin token>`.

    Use as `APIRouter(dependencies=[Depends(require_admin_token(settings.admin_token))])`. Without a
    configured token every admin route answers 503, so an unset token never means "open".
    """
    expected = (
        admin_token.get_secret_value().encode() if admin_token and admin_token.get_secret_value() else None
    )

    async def check_admin_token(request: Request) -> None:
        if expected is None:
            raise ApiError(
                503, "admin API disabled: set WORKER_ADMIN_TOKEN to enable it", code="admin_disabled"
            )
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
            raise ApiError(
                401,
                "missing or wrong admin token",
                code="invalid_admin_token",
                headers={"www-authenticate": "Bearer"},
            )

    return check_admin_token


def build_admin_router(store: LedgerStore, admin_token: SecretStr | None) -> APIRouter:
    router = APIRouter(
        prefix="/admin", dependencies=[Depends(require_admin_token(admin_token))], tags=["admin"]
    )

    @router.post("/accounts", status_code=201)
    async def create_account(body: CreateAccountRequest) -> dict[str, Any]:
        account = await open_account(store, body.name, usd_to_micro(body.initial_balance_usd))
        return {"data": AccountView.of(account)}

    @router.get("/accounts")
    async def list_accounts() -> dict[str, Any]:
        return {"object": "list", "data": [AccountView.of(a) for a in await store.list_accounts()]}

    @router.get("/accounts/{account_id}")
    async def get_account(account_id: str) -> dict[str, Any]:
        account = await store.get_account(account_id)
        if account is None:
            raise ApiError(404, f"no account '{account_id}'", code="account_not_found")
        return {"data": AccountView.of(account)}

    @router.post("/accounts/{account_id}/topup")
    async def top_up(account_id: str, body: TopUpRequest) -> dict[str, Any]:
        try:
            account = await store.top_up(account_id, usd_to_micro(body.amount_usd))
        except UnknownAccount:
            raise ApiError(404, f"no account '{account_id}'", code="account_not_found") from None
        return {"data": AccountView.of(account)}

    @router.post("/keys", status_code=201)
    async def create_key(body: CreateKeyRequest) -> CreatedKey:
        expires_at = body.expires_at
        if body.expires_in_days is not None:
            expires_at = datetime.now(UTC) + timedelta(days=body.expires_in_days)
        cap = body.monthly_spend_cap_usd
        limits = KeyLimits(
            allowed_models=tuple(body.allowed_models),
            requests_per_minute=body.requests_per_minute,
            tokens_per_minute=body.tokens_per_minute,
            monthly_spend_cap_micro=usd_to_micro(cap) if cap is not None else None,
        )
        try:
            issued = await issue_key(
                store,
                account_id=body.account_id,
                name=body.name,
                limits=limits,
                byok=body.is_byok,
                expires_at=expires_at,
            )
        except UnknownAccount:
            raise ApiError(
                404, f"no account '{body.account_id}'", code="account_not_found", param="account_id"
            ) from None
        return CreatedKey(key=issued.plaintext.get_secret_value(), data=KeyView.of(issued.key, _month()))

    @router.get("/keys")
    async def list_keys(account_id: str | None = None) -> dict[str, Any]:
        month = _month()
        return {"object": "list", "data": [KeyView.of(k, month) for k in await store.list_keys(account_id)]}

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        key = await store.revoke_key(key_id, time.time())
        if key is None:
            raise ApiError(404, f"no key '{key_id}'", code="key_not_found")
        return {"data": KeyView.of(key, _month())}

    @router.get("/usage/export")
    async def export_usage(
        format: Literal["csv", "jsonl"] = "jsonl",
        since: datetime | None = None,
        until: datetime | None = None,
        model: str | None = None,
        account_id: str | None = None,
        key_id: str | None = None,
        request_id: str | None = None,
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
