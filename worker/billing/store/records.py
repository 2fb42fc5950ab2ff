"""What the billing store holds: accounts, API keys, reservations, ledger records and the admin audit trail."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

MICROS_PER_USD = 1_000_000
# The most an account may hold, and so the most one top-up or cap may be: USD 1e9 (1e15 micro-USD) is far
# beyond any prepaid balance, and sums and differences of such amounts stay well inside int64 (9.2e18).
MAX_BALANCE_USD = 1_000_000_000
MAX_BALANCE_MICRO = MAX_BALANCE_USD * MICROS_PER_USD


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


def utc_month(epoch_s: float) -> str:
    """The calendar month spend caps count in, e.g. '2026-11'."""
    return time.strftime("%Y-%m", time.gmtime(epoch_s))


def to_epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def from_epoch(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def from_optional_epoch(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else from_epoch(epoch_s)


class Account(Record):
    id: str
    name: str
    balance_micro: int
    # Worst-case costs of requests in flight; `balance - reserved` is what new requests may spend.
    reserved_micro: int
    created_at: datetime

    @property
    def available_micro(self) -> int:
        return self.balance_micro - self.reserved_micro


class KeyLimits(Record):
    allowed_models: tuple[str, ...] = ()  # empty: every model
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    monthly_spend_cap_micro: int | None = Field(default=None, ge=0)


class ApiKey(Record):
    id: str
    account_id: str
    name: str
    prefix: str
    key_hash: str = Field(repr=False)
    limits: KeyLimits
    byok: bool = False
    # Queued requests of a higher priority go first (routers mark keys prioritised or fallback).
    priority: int = 0
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    reserved_micro: int = 0
    spend_month: str | None = None
    month_spent_micro: int = 0

    def allows_model(self, model_id: str) -> bool:
        return not self.limits.allowed_models or model_id in self.limits.allowed_models

    def is_expired(self, now_s: float) -> bool:
        return self.expires_at is not None and to_epoch(self.expires_at) <= now_s

    def spent_in(self, month: str) -> int:
        return self.month_spent_micro if self.spend_month == month else 0


class NewApiKey(Record):
    """Everything needed to store a key; the plaintext never reaches the store."""

    id: str
    account_id: str
    name: str
    prefix: str
    key_hash: str = Field(repr=False)
    limits: KeyLimits
    byok: bool = False
    priority: int = 0
    created_at: datetime
    expires_at: datetime | None = None


class ReserveOutcome(str, Enum):
    reserved = "reserved"
    insufficient_balance = "insufficient_balance"
    spend_cap_reached = "spend_cap_reached"
    key_revoked = "key_revoked"


class Reservation(Record):
    record_id: str
    account_id: str
    key_id: str
    amount_micro: int = Field(ge=0)
    holder: str  # the worker holding it; a restarted worker releases what it held before
    month: str
    created_at: float


class LedgerEntry(NamedTuple):
    """One finished request's ledger record as the gateway writes it: a `LedgerRecord` without its `seq`,
    `received_at` in epoch seconds, fields in the order of the ledger's insert.

    A plain tuple because one is built on the event loop for every request, where building a pydantic model
    cost nearly ten times as much; every value is the gateway's own and already of its field's type.
    """

    record_id: str
    request_id: str
    worker_id: str
    key_id: str | None
    account_id: str | None
    model: str
    endpoint: str
    replica_id: str | None
    gpu_uuids: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    usage_estimated: bool
    cost_micro: int
    status_code: int
    outcome: str
    finish_reason: str | None
    stream: bool
    received_at: float
    ttft_ms: float | None
    duration_ms: float
    # Where each count came from (worker.gateway.context.UsageSource): measured ("engine", "tokenizer") or
    # estimated ("stream", "estimate"); "none" where nothing was counted.
    prompt_tokens_source: str = "engine"
    completion_tokens_source: str = "engine"
    # The request's share of its replica's busy GPU time, times the replica's GPUs; 0 where none was measured.
    gpu_seconds: float = 0.0


class LedgerRecord(Record):
    """One request, as billed. Appended once, never changed."""

    seq: int | None = None  # assigned by the store; orders the outbox
    record_id: str  # generated by the worker, unique: the ledger's and the outbox's key
    request_id: str  # the x-request-id the client saw (possibly its own): for look-ups, may repeat
    worker_id: str
    key_id: str | None
    account_id: str | None
    model: str
    endpoint: str
    replica_id: str | None
    gpu_uuids: tuple[str, ...] = ()
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    usage_estimated: bool = False
    cost_micro: int
    status_code: int
    outcome: str
    finish_reason: str | None
    stream: bool
    received_at: datetime
    ttft_ms: float | None
    duration_ms: float
    prompt_tokens_source: str = "engine"
    completion_tokens_source: str = "engine"
    gpu_seconds: float = 0.0


class ReplicaUptime(NamedTuple):
    """One run of a replica's engine; while running (`stopped_at` None) it counts up to `seen_at`, the
    worker's last heartbeat, so a worker that died without stopping it counts until then."""

    worker_id: str
    replica_id: str
    started_at: float
    model: str
    gpus: int
    ready_at: float | None
    stopped_at: float | None
    seen_at: float


class WorkerClaim(Record):
    """Which running worker holds a worker id, since when, and when it last renewed its claim."""

    worker_id: str
    instance_id: str
    # Where it runs: the process (id and start time) on that host. A holder on this host can be seen to
    # be gone, e.g. after the container restarted, without waiting for its claim to lapse.
    host: str
    pid: int
    process_started_at: float
    claimed_at: float
    seen_at: float


class LedgerFilter(Record):
    request_id: str | None = None
    key_id: str | None = None
    account_id: str | None = None
    worker_id: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive


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
