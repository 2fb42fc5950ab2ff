"""The billing store's records (worker/billing/store/records.py), under the name the rest of billing uses."""

from worker.billing.store.records import (
    Account,
    ApiKey,
    KeyLimits,
    LedgerEntry,
    LedgerFilter,
    LedgerRecord,
    NewApiKey,
    Record,
    Reservation,
    ReserveOutcome,
    WorkerClaim,
    from_epoch,
    from_optional_epoch,
    to_epoch,
    utc_month,
)

__all__ = [
    "Account",
    "ApiKey",
    "KeyLimits",
    "LedgerEntry",
    "LedgerFilter",
    "LedgerRecord",
    "NewApiKey",
    "Record",
    "Reservation",
    "ReserveOutcome",
    "WorkerClaim",
    "from_epoch",
    "from_optional_epoch",
    "to_epoch",
    "utc_month",
]
