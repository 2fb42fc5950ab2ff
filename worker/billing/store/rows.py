"""Between database rows and records: the same column lists and conversions for both dialects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from worker.billing.store.records import (
    Account,
    AdminAction,
    AdminAuditRecord,
    ApiKey,
    KeyLimits,
    LedgerEntry,
    LedgerFilter,
    LedgerRecord,
    WorkerClaim,
    from_epoch,
    from_optional_epoch,
    to_epoch,
)

ACCOUNT_COLUMNS = "id, name, balance_micro, reserved_micro, created_at"
KEY_COLUMNS = (
    "id, account_id, name, prefix, key_hash, allowed_models, rpm_limit, tpm_limit, monthly_cap_micro, byok, "
    "created_at, expires_at, revoked_at, reserved_micro, spend_month, month_spent_micro, priority"
)
LEDGER_INSERT_COLUMNS = LedgerEntry._fields
LEDGER_COLUMNS = "seq, " + ", ".join(LEDGER_INSERT_COLUMNS)


def account_from_row(row: Mapping[str, Any]) -> Account:
    return Account(
        id=row["id"],
        name=row["name"],
        balance_micro=row["balance_micro"],
        reserved_micro=row["reserved_micro"],
        created_at=from_epoch(row["created_at"]),
    )


def key_from_row(row: Mapping[str, Any]) -> ApiKey:
    limits = KeyLimits(
        allowed_models=tuple(orjson.loads(row["allowed_models"])),
        requests_per_minute=row["rpm_limit"],
        tokens_per_minute=row["tpm_limit"],
        monthly_spend_cap_micro=row["monthly_cap_micro"],
    )
    return ApiKey(
        id=row["id"],
        account_id=row["account_id"],
        name=row["name"],
        prefix=row["prefix"],
        key_hash=row["key_hash"],
        limits=limits,
        byok=bool(row["byok"]),
        priority=row["priority"],
        created_at=from_epoch(row["created_at"]),
        expires_at=from_optional_epoch(row["expires_at"]),
        revoked_at=from_optional_epoch(row["revoked_at"]),
        reserved_micro=row["reserved_micro"],
        spend_month=row["spend_month"],
        month_spent_micro=row["month_spent_micro"],
    )


def new_key_params(key: ApiKey) -> tuple[Any, ...]:
    """In the order of KEY_INSERT_COLUMNS."""
    return (
        key.id,
        key.account_id,
        key.name,
        key.prefix,
        key.key_hash,
        orjson.dumps(list(key.limits.allowed_models)).decode(),
        key.limits.requests_per_minute,
        key.limits.tokens_per_minute,
        key.limits.monthly_spend_cap_micro,
        key.byok,
        to_epoch(key.created_at),
        to_epoch(key.expires_at) if key.expires_at else None,
        key.priority,
    )


KEY_INSERT_COLUMNS = (
    "id, account_id, name, prefix, key_hash, allowed_models, rpm_limit, tpm_limit, monthly_cap_micro, byok, "
    "created_at, expires_at, priority"
)
KEY_INSERT_COUNT = KEY_INSERT_COLUMNS.count(",") + 1


ADMIN_AUDIT_INSERT = "at, actor, client, request_id, action, target, changes"
ADMIN_AUDIT_COLUMNS = "seq, " + ADMIN_AUDIT_INSERT


def admin_audit_params(action: AdminAction) -> tuple[Any, ...]:
    """In the order of ADMIN_AUDIT_INSERT."""
    return (action.at, action.actor, action.client, action.request_id, action.action, action.target,
            orjson.dumps(action.changes, default=str).decode())


def admin_audit_from_row(row: Mapping[str, Any]) -> AdminAuditRecord:
    return AdminAuditRecord(**{**dict(row), "changes": orjson.loads(row["changes"])})


def claim_from_row(row: Mapping[str, Any]) -> WorkerClaim:
    return WorkerClaim.model_validate(dict(row))


def claim_params(claim: WorkerClaim) -> tuple[Any, ...]:
    """The first parameters of WORKER_CLAIM."""
    return (claim.worker_id, claim.instance_id, claim.host, claim.pid, claim.process_started_at, claim.claimed_at,
            claim.seen_at)


_GPU_UUIDS = LedgerEntry._fields.index("gpu_uuids")


def ledger_params(entry: LedgerEntry) -> tuple[Any, ...]:
    """In the order of LEDGER_INSERT_COLUMNS: the entry, with its GPU uuids in one text column."""
    return (*entry[:_GPU_UUIDS], ",".join(entry.gpu_uuids), *entry[_GPU_UUIDS + 1 :])


def ledger_from_row(row: Mapping[str, Any]) -> LedgerRecord:
    values = dict(row)
    values["gpu_uuids"] = tuple(u for u in (values["gpu_uuids"] or "").split(",") if u)
    values["usage_estimated"] = bool(values["usage_estimated"])
    values["stream"] = bool(values["stream"])
    values["received_at"] = from_epoch(values["received_at"])
    return LedgerRecord(**values)


def ledger_conditions(where: LedgerFilter) -> list[tuple[str, Any]]:
    """(SQL condition with one `{}` placeholder, value) pairs; each dialect fills in its own placeholder."""
    conditions: list[tuple[str, Any]] = []
    for column in ("request_id", "key_id", "account_id", "worker_id", "model"):
        value = getattr(where, column)
        if value is not None:
            conditions.append((f"{column} = {{}}", value))
    if where.since is not None:
        conditions.append(("received_at >= {}", to_epoch(where.since)))
    if where.until is not None:
        conditions.append(("received_at < {}", to_epoch(where.until)))
    return conditions
