"""The billing schema as ordered migration steps, one statement list per SQL dialect.

A database records the steps it has applied in `schema_version`; opening it applies the missing ones in
one transaction. Steps are never edited once released; a change is a new step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


def _common_tables(ledger_seq: str, false: str) -> tuple[str, ...]:
    return (
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            balance_micro BIGINT NOT NULL DEFAULT 0,
            reserved_micro BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micro >= 0),
            created_at DOUBLE PRECISION NOT NULL
        )""",
        f"""CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts (id),
            name TEXT NOT NULL DEFAULT '',
            prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            allowed_models TEXT NOT NULL DEFAULT '[]',
            rpm_limit INTEGER,
            tpm_limit INTEGER,
            monthly_cap_micro BIGINT,
            byok BOOLEAN NOT NULL DEFAULT {false},
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION,
            reserved_micro BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micro >= 0),
            spend_month TEXT,
            month_spent_micro BIGINT NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX api_keys_account ON api_keys (account_id)",
        """CREATE TABLE reservations (
            record_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            amount_micro BIGINT NOT NULL,
            holder TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX reservations_holder ON reservations (holder)",
        f"""CREATE TABLE ledger (
            seq {ledger_seq},
            record_id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            worker_id TEXT NOT NULL,
            key_id TEXT,
            account_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            replica_id TEXT,
            gpu_uuids TEXT NOT NULL DEFAULT '',
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            usage_estimated BOOLEAN NOT NULL DEFAULT {false},
            cost_micro BIGINT NOT NULL,
            status_code INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            finish_reason TEXT,
            stream BOOLEAN NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX ledger_request_id ON ledger (request_id)",
        "CREATE INDEX ledger_key_seq ON ledger (key_id, seq)",
        "CREATE INDEX ledger_account_seq ON ledger (account_id, seq)",
        "CREATE INDEX ledger_worker_seq ON ledger (worker_id, seq)",
        "CREATE INDEX ledger_received_at ON ledger (received_at)",
        """CREATE TABLE outbox_cursors (
            worker_id TEXT PRIMARY KEY,
            last_seq BIGINT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
    )


# Reservations are held in a worker id's name, and a starting worker releases what its id held: two
# running workers with one id would release each other's. The claim keeps the id to one at a time.
_WORKER_CLAIMS = """CREATE TABLE worker_claims (
    worker_id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started_at DOUBLE PRECISION NOT NULL,
    claimed_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
)"""


# Records written before this step were all counted by the engine, or flagged `usage_estimated`.
_USAGE_SOURCES = (
    "ALTER TABLE ledger ADD COLUMN prompt_tokens_source TEXT NOT NULL DEFAULT 'engine'",
    "ALTER TABLE ledger ADD COLUMN completion_tokens_source TEXT NOT NULL DEFAULT 'engine'",
)


# Every change made with the admin token or `worker keys`; append-only like the ledger.
def _admin_audit(seq: str) -> str:
    return f"""CREATE TABLE admin_audit (
        seq {seq},
        at DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        client TEXT,
        request_id TEXT,
        action TEXT NOT NULL,
        target TEXT,
        changes TEXT NOT NULL
    )"""


# Keys a router marks prioritised get a higher priority in the worker's queue; 0 for every key before.
_KEY_PRIORITY = ("ALTER TABLE api_keys ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",)


# GPU-seconds attributed to each request (0 for records before), and each replica's up-time: from start
# to stop, or to its last heartbeat (`seen_at`) when the worker died without stopping it.
_GPU_TIME = (
    "ALTER TABLE ledger ADD COLUMN gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0",
    """CREATE TABLE replica_uptime (
        worker_id TEXT NOT NULL, replica_id TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
        model TEXT NOT NULL, gpus INTEGER NOT NULL, ready_at DOUBLE PRECISION, stopped_at DOUBLE PRECISION,
        seen_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (worker_id, replica_id, started_at)
    )""",
)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="accounts, api keys, reservations, append-only ledger, outbox cursors",
        sqlite=(
            *_common_tables("INTEGER PRIMARY KEY AUTOINCREMENT", "0"),
            """CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
               BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
            """CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
               BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
        ),
        postgres=(
            *_common_tables("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "FALSE"),
            """CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'the ledger is append-only'; END $$""",
            """CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
               FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()""",
        ),
    ),
    Migration(
        version=2,
        description="worker claims: one running worker per worker id",
        sqlite=(_WORKER_CLAIMS,),
        postgres=(_WORKER_CLAIMS,),
    ),
    Migration(
        version=3,
        description="ledger: where each token count came from (measured or estimated)",
        sqlite=_USAGE_SOURCES,
        postgres=_USAGE_SOURCES,
    ),
    Migration(
        version=4,
        description="admin audit: every change made with the admin token or `worker keys`",
        sqlite=(
            _admin_audit("INTEGER PRIMARY KEY AUTOINCREMENT"),
            """CREATE TRIGGER admin_audit_no_update BEFORE UPDATE ON admin_audit
               BEGIN SELECT RAISE(ABORT, 'the admin audit is append-only'); END""",
            """CREATE TRIGGER admin_audit_no_delete BEFORE DELETE ON admin_audit
               BEGIN SELECT RAISE(ABORT, 'the admin audit is append-only'); END""",
        ),
        postgres=(
            _admin_audit("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
            """CREATE FUNCTION admin_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'the admin audit is append-only'; END $$""",
            """CREATE TRIGGER admin_audit_append_only BEFORE UPDATE OR DELETE ON admin_audit
               FOR EACH STATEMENT EXECUTE FUNCTION admin_audit_append_only()""",
        ),
    ),
    Migration(
        version=5,
        description="api keys: a priority in the worker's queue",
        sqlite=_KEY_PRIORITY,
        postgres=_KEY_PRIORITY,
    ),
    Migration(
        version=6,
        description="ledger gpu seconds; replica up-time",
        sqlite=_GPU_TIME,
        postgres=_GPU_TIME,
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer worker; running an older one against it could corrupt it."""


def pending_migrations(applied_version: int) -> tuple[Migration, ...]:
    if applied_version > LATEST_VERSION:
        raise SchemaTooNew(
            f"the billing database is at schema version {applied_version}, newer than this worker's "
            f"{LATEST_VERSION}; upgrade the worker"
        )
    return tuple(m for m in MIGRATIONS if m.version > applied_version)
