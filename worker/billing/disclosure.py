"""What every response tells its client, with the ledger on or off: where it ran and what it cost.

Provenance `x-worker-*` headers go on every response (refusals included), and the usage object the
client receives carries `usage.cost`, priced from `models.yaml` and the engine's own token counts.
Neither needs the ledger, so this hook is installed on every node, ahead of the billing hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.billing.money import micro_to_json_number
from worker.billing.pricing import charge_micro
from worker.billing.provenance import Provenance, ProvenanceSource
from worker.gateway.context import RequestContext, RequestView

# How long a replica's provenance is reused before it is read again (from the GPU monitor, which
# polls every few seconds); a change of engine version is seen at once.
PROVENANCE_MAX_AGE_S = 5.0


@dataclass(frozen=True, slots=True)
class _Described:
    provenance: Provenance
    headers: dict[str, str]
    engine_version: object
    read_at: float


class ProvenanceCache:
    """Provenance per replica, reused across requests instead of built for each.

    `describe(replica)` (None: the node itself, before routing) is the node's full account of it; it is
    read again when `engine_version_of(replica)` (a cheap read) changes, once it is `max_age_s` old (so
    a change of GPUs shows within seconds), and after `invalidate()`.
    """

    def __init__(
        self,
        describe: ProvenanceSource,
        *,
        engine_version_of: Callable[[Any], object] = lambda replica: None,
        max_age_s: float = PROVENANCE_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._describe = describe
        self._engine_version_of = engine_version_of
        self._max_age_s = max_age_s
        self._clock = clock
        self._by_replica: dict[str, _Described] = {}
        self.node = describe(None)  # the node's own part never changes
        self.node_headers = self.node.headers()

    def __call__(self, replica: Any) -> Provenance:
        return self.node if replica is None else self._described(replica).provenance

    def headers(self, replica: Any) -> dict[str, str]:
        return self.node_headers if replica is None else self._described(replica).headers

    def invalidate(self) -> None:
        """Read every replica's provenance afresh on its next request (e.g. after a GPU change)."""
        self._by_replica.clear()

    def _described(self, replica: Any) -> _Described:
        now = self._clock()
        version = self._engine_version_of(replica)
        known = self._by_replica.get(replica.replica_id)
        if known is not None and known.engine_version == version and now - known.read_at < self._max_age_s:
            return known
        provenance = self._describe(replica)
        described = _Described(provenance, provenance.headers(), version, now)
        self._by_replica[replica.replica_id] = described
        return described


def usage_cost(ctx: RequestContext) -> dict[str, Any]:
    """The `usage.cost` field: what the request's usage so far costs at the model's prices."""
    cost = charge_micro(ctx.model, ctx.endpoint, ctx.usage, ctx.finish_reason, ctx.outcome)
    return {"cost": micro_to_json_number(cost)}


class DisclosureHook:
    """Request hook: provenance headers on every response, `usage.cost` in every usage object."""

    def __init__(self, provenance: ProvenanceCache) -> None:
        self.provenance = provenance

    async def before_request(self, ctx: RequestContext, request: RequestView) -> None:
        # Before the replica is known, so that refusals say which worker refused.
        ctx.response_headers.update(self.provenance.node_headers)

    def after_route(self, ctx: RequestContext) -> None:
        ctx.response_headers.update(self.provenance.headers(ctx.replica))

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]:
        return usage_cost(ctx)

    async def finalize(self, ctx: RequestContext) -> None:
        return None
