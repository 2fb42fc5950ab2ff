"""The admin audit trail: every change made through `/admin/*` or `worker keys`, logged and kept in the
billing database's append-only `admin_audit` table (read back with `GET /admin/audit`)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from worker.billing.records import Record, from_epoch

if TYPE_CHECKING:
    from worker.billing.store import LedgerStore

logger = logging.getLogger(__name__)

Actor = Literal["admin", "cli"]


class AdminAction(Record):
    """One change, as the store appends it."""

    at: float  # epoch seconds
    actor: Actor  # "admin": through the admin API with the admin token; "cli": `worker keys` on the database
    client: str | None = None  # the admin API caller's address
    request_id: str | None = None
    action: str  # e.g. "account.create", "account.topup", "key.create", "key.revoke", "worker.drain"
    target: str | None = None  # the account or key id it changed
    changes: dict[str, Any]  # what it changed: new values, amounts; never a secret


class AdminAuditRecord(AdminAction):
    seq: int  # assigned by the store; orders the trail and pages it

    def view(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"at"}), "at": self.time}

    @property
    def time(self) -> datetime:
        return from_epoch(self.at)


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
