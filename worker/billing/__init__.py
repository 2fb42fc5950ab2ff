"""API keys, prepaid balances, the usage ledger and its outbox.

`BillingService` plugs into the gateway as a request hook: it authenticates and rate-limits each request,
reserves its worst-case cost before the engine sees it, and settles the real cost into an append-only
ledger before the response ends. `DisclosureHook`, installed with or without the ledger, puts provenance
headers and `usage.cost` on every response.
"""

from worker.billing.disclosure import DisclosureHook, ProvenanceCache, usage_cost
from worker.billing.metering import Principal
from worker.billing.provenance import Provenance, ProvenanceSource
from worker.billing.service import BillingBacklog, BillingService
from worker.billing.store import LedgerStore, open_store

__all__ = [
    "BillingBacklog",
    "BillingService",
    "DisclosureHook",
    "LedgerStore",
    "Principal",
    "Provenance",
    "ProvenanceCache",
    "ProvenanceSource",
    "open_store",
    "usage_cost",
]
