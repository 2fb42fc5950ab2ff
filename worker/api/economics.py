"""`GET /admin/economics`: the `worker economics --format json` report over HTTP, behind the admin token."""

# No `from __future__ import annotations`: FastAPI must see the real `Annotated[..., Query()]` parameters.
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from worker.api.admin_auth import AdminAccess
from worker.billing.store import LedgerStore
from worker.config import NodeConfig
from worker.economics.options import BadOption, target_margin, window
from worker.economics.render import as_json
from worker.economics.report import economics_report
from worker.gateway.errors import ApiError

Text = Annotated[str | None, Query(min_length=1, max_length=256)]


def build_economics_router(
    store: LedgerStore, config: NodeConfig, access: AdminAccess,
    before_report: Callable[[], Awaitable[None]] | None = None,
) -> APIRouter:
    """`before_report`: brings the running worker's replica up-time up to now (it is otherwise renewed every
    heartbeat), so a window ending now counts the running replicas to now."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(access)], tags=["admin"])

    @router.get("/economics")
    async def economics(since: Text = None, until: Text = None, model: Text = None, worker: Text = None,
                        target_margin_: Annotated[str | None, Query(alias="target_margin", max_length=64)] = None,
                        ) -> dict[str, Any]:
        """Revenue against GPU cost per model and for the node (see worker/economics/compute.py)."""
        try:
            start, end = window(since, until, datetime.now(UTC))
            margin = target_margin(target_margin_)
        except BadOption as bad:
            raise ApiError(400, f"invalid value for '{bad.option}': {bad.message}", param=bad.option) from None
        if before_report is not None:
            await before_report()
        return as_json(await economics_report(store, config, start, end, model=model, worker_id=worker,
                                              target_margin=margin))

    return router
