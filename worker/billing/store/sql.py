"""The SQL both dialects share: column lists, statements, and the conversions between rows and records.

Statements are written once with `{0}`, `{1}`... for parameters: SQLite and PostgreSQL both accept numbered
parameters (`?1` and `$1`), so a parameter used twice is passed once and the same argument tuple serves both.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
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
KEY_INSERT_COLUMNS = (
    "id, account_id, name, prefix, key_hash, allowed_models, rpm_limit, tpm_limit, monthly_cap_micro, byok, "
    "created_at, expires_at, priority"
)
KEY_COLUMNS = KEY_INSERT_COLUMNS + ", revoked_at, reserved_micro, spend_month, month_spent_micro"
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


def _numbered(count: int) -> str:
    return ", ".join(f"{{{number}}}" for number in range(count))


ACCOUNT_INSERT = (
    "INSERT INTO accounts (id, name, balance_micro, created_at) VALUES ({0}, {1}, {2}, {3}) "
    f"RETURNING {ACCOUNT_COLUMNS}"
)
ACCOUNT_EXISTS = "SELECT 1 FROM accounts WHERE id = {0}"
# A top-up ({0}) to account {1} that would take the balance past {2} changes nothing.
TOP_UP = (
    "UPDATE accounts SET balance_micro = balance_micro + {0} WHERE id = {1} AND balance_micro + {0} <= {2} "
    f"RETURNING {ACCOUNT_COLUMNS}"
)
KEY_INSERT = (
    f"INSERT INTO api_keys ({KEY_INSERT_COLUMNS}) VALUES ({_numbered(KEY_INSERT_COLUMNS.count(',') + 1)}) "
    f"RETURNING {KEY_COLUMNS}"
)
KEY_REVOKE = f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {{0}}) WHERE id = {{1}} RETURNING {KEY_COLUMNS}"
ADMIN_AUDIT_APPEND = f"INSERT INTO admin_audit ({ADMIN_AUDIT_INSERT}) VALUES ({_numbered(7)}) RETURNING seq"
LEDGER_INSERT = (
    f"INSERT INTO ledger ({', '.join(LEDGER_INSERT_COLUMNS)}) VALUES ({_numbered(len(LEDGER_INSERT_COLUMNS))}) "
    "ON CONFLICT (record_id) DO NOTHING RETURNING seq"
)
RESERVATION_INSERT = (
    "INSERT INTO reservations (record_id, account_id, key_id, amount_micro, holder, created_at) "
    "VALUES ({0}, {1}, {2}, {3}, {4}, {5})"
)
# Dropping reservations without charging: of one record ({0}), or a holder's ({0}) and any made before {1}.
RESERVATION_DROP = "DELETE FROM reservations WHERE record_id = {0} RETURNING key_id, account_id, amount_micro"
RESERVATIONS_DROP_GONE = (
    "DELETE FROM reservations WHERE holder = {0} OR created_at < {1} RETURNING key_id, account_id, amount_micro"
)
KEY_UNRESERVE = "UPDATE api_keys SET reserved_micro = reserved_micro - {0} WHERE id = {1}"
ACCOUNT_UNRESERVE = "UPDATE accounts SET reserved_micro = reserved_micro - {0} WHERE id = {1}"
ADVANCE_OUTBOX = (
    "INSERT INTO outbox_cursors (worker_id, last_seq, updated_at) VALUES ({0}, {1}, {2}) "
    "ON CONFLICT (worker_id) DO UPDATE SET last_seq = excluded.last_seq, "
    "updated_at = excluded.updated_at WHERE outbox_cursors.last_seq < excluded.last_seq"
)

# The key's part of a reservation: refused once revoked or when the monthly cap cannot cover it.
KEY_RESERVE = """
UPDATE api_keys SET reserved_micro = reserved_micro + {0}
WHERE id = {1} AND revoked_at IS NULL AND (
    monthly_cap_micro IS NULL
    OR (CASE WHEN spend_month = {2} THEN month_spent_micro ELSE 0 END) + reserved_micro + {0}
        <= monthly_cap_micro
)"""

KEY_STATE = "SELECT revoked_at FROM api_keys WHERE id = {0}"

# The account's part: refused when what is left after other reservations cannot cover it.
ACCOUNT_RESERVE = """
UPDATE accounts SET reserved_micro = reserved_micro + {0}
WHERE id = {1} AND balance_micro - reserved_micro >= {0}"""

# Settling: release the reservation, count the cost in its month (an older month's late charge does
# not reset the current month's counter).
KEY_CHARGE = """
UPDATE api_keys SET
    reserved_micro = reserved_micro - {0},
    month_spent_micro = CASE
        WHEN spend_month = {1} THEN month_spent_micro + {2}
        WHEN spend_month IS NULL OR spend_month < {1} THEN {2}
        ELSE month_spent_micro END,
    spend_month = CASE WHEN spend_month IS NULL OR spend_month < {1} THEN {1} ELSE spend_month END
WHERE id = {3}"""

ACCOUNT_CHARGE = """
UPDATE accounts SET balance_micro = balance_micro - {0}, reserved_micro = reserved_micro - {1}
WHERE id = {2}"""

# A worker id is claimed by one running worker at a time: a starting worker takes it over only from
# itself, from a holder that stopped renewing its claim (seen before {7}), or from the holder known to
# be gone ({8}: an instance id, or '' for none).
WORKER_CLAIM = """
INSERT INTO worker_claims (worker_id, instance_id, host, pid, process_started_at, claimed_at, seen_at)
VALUES ({0}, {1}, {2}, {3}, {4}, {5}, {6})
ON CONFLICT (worker_id) DO UPDATE SET
    instance_id = excluded.instance_id, host = excluded.host, pid = excluded.pid,
    process_started_at = excluded.process_started_at, claimed_at = excluded.claimed_at, seen_at = excluded.seen_at
WHERE worker_claims.instance_id = excluded.instance_id OR worker_claims.seen_at < {7}
    OR worker_claims.instance_id = {8}"""

WORKER_CLAIM_HOLDER = (
    "SELECT worker_id, instance_id, host, pid, process_started_at, claimed_at, seen_at "
    "FROM worker_claims WHERE worker_id = {0}"
)

WORKER_CLAIM_RENEW = "UPDATE worker_claims SET seen_at = {2} WHERE worker_id = {0} AND instance_id = {1}"

WORKER_CLAIM_RELEASE = "DELETE FROM worker_claims WHERE worker_id = {0} AND instance_id = {1}"

REPLICA_UPTIME_SAVE = """
INSERT INTO replica_uptime (worker_id, replica_id, started_at, model, gpus, ready_at, stopped_at, seen_at)
VALUES ({0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}) ON CONFLICT (worker_id, replica_id, started_at) DO UPDATE SET
    ready_at = excluded.ready_at, stopped_at = excluded.stopped_at, seen_at = excluded.seen_at"""

SCHEMA_VERSION_INSERT = "INSERT INTO schema_version VALUES ({0}, {1}, {2})"

_MAX_PARAMETERS = 32


def in_dialect(parameter: str) -> SimpleNamespace:
    """Every statement of this module, its parameters written as the dialect writes them (`?{}` or `${}`)."""
    numbered = [parameter.format(number) for number in range(1, _MAX_PARAMETERS + 1)]
    return SimpleNamespace(**{
        name: value.format(*numbered)
        for name, value in globals().items()
        if name.isupper() and isinstance(value, str) and "{0}" in value
    })
