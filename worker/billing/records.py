"""What the billing store holds: accounts, API keys, reservations and ledger records."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


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
    created_at: datetime
    expires_at: datetime | None = None


class ReserveOutcome(str, Enum):
    reserved = "reserved"
    insufficient_balance = "insufficient_balance"
    spend_cap_reached = "spend_cap_reached"
    duplicate_request = "duplicate_request"
    key_revoked = "key_revoked"


class Reservation(Record):
    request_id: str
    account_id: str
    key_id: str
    amount_micro: int = Field(ge=0)
    holder: str  # the worker holding it; a restarted worker releases what it held before
    month: str
    created_at: float


class LedgerRecord(Record):
    """One request, as billed. Appended once, never changed."""

    seq: int | None = None  # assigned by the store; orders the outbox
    request_id: str
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


class LedgerFilter(Record):
    key_id: str | None = None
    account_id: str | None = None
    worker_id: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive
