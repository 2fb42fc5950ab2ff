"""The admin audit trail: every change made through `/admin/*` or `worker keys`, logged and kept in the
billing database's append-only `admin_audit` table (read back with `GET /admin/audit`)."""

from __future__ import annotations

import logging

from worker.billing.store import LedgerStore
from worker.billing.store.records import AdminAction

logger = logging.getLogger(__name__)


async def audit(store: LedgerStore | None, action: AdminAction) -> None:
    """Log the change and append it to the audit table (`store` None: the ledger is off, the log only)."""
    logger.info(
        "admin action",
        extra={
            "action": action.action,
            "actor": action.actor,
            "client": action.client,
            "request_id": action.request_id,
            "target": action.target,
            "changes": action.changes,
        },
    )
    if store is not None:
        await store.append_admin_audit(action)
