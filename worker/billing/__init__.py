"""API keys, prepaid balances, the usage ledger and its outbox.

`BillingService` plugs into the gateway as a request hook: it authenticates and rate-limits each request,
reserves its worst-case cost before the engine sees it, and settles the real cost into an append-only
ledger before the response ends. `DisclosureHook`, installed with or without the ledger, puts provenance
headers and `usage.cost` on every response.
"""
