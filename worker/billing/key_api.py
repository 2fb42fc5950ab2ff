"""`GET /v1/key` and `GET /v1/usage`: what a key holder may see of their own key and requests."""

# No `from __future__ import annotations`: FastAPI must see the real `Depends(current_key)` annotation.
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.requests import Request

from worker.billing.authentication import KeyAuthenticator
from worker.billing.export import record_json
from worker.billing.paging import Cursor, PageSize, cursor_value, next_cursor
from worker.billing.store import LedgerStore
from worker.billing.store.records import ApiKey, LedgerFilter, utc_month
from worker.billing.views import OwnKeyView, QueryText
from worker.gateway.errors import ApiError, api_error
from worker.refusals import InvalidKey


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
