"""Statements both dialects share, written once with `{0}`, `{1}`... for parameters.

SQLite and PostgreSQL both accept numbered parameters (`?1` and `$1`), so a parameter used twice is
passed once and the same argument tuple serves both.
"""

from __future__ import annotations

from types import SimpleNamespace

from worker.billing.store.rows import (
    ACCOUNT_COLUMNS,
    ADMIN_AUDIT_INSERT,
    KEY_COLUMNS,
    KEY_INSERT_COLUMNS,
    KEY_INSERT_COUNT,
    LEDGER_INSERT_COLUMNS,
)


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
    f"INSERT INTO api_keys ({KEY_INSERT_COLUMNS}) VALUES ({_numbered(KEY_INSERT_COUNT)}) RETURNING {KEY_COLUMNS}"
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

_MAX_PARAMETERS = 32


def in_dialect(parameter: str) -> SimpleNamespace:
    """Every statement of this module, its parameters written as the dialect writes them (`?{}` or `${}`)."""
    numbered = [parameter.format(number) for number in range(1, _MAX_PARAMETERS + 1)]
    return SimpleNamespace(**{
        name: value.format(*numbered)
        for name, value in globals().items()
        if name.isupper() and isinstance(value, str) and "{0}" in value
    })
