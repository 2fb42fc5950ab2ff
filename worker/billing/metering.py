"""Metering: the ledger record written when a request ends."""

from __future__ import annotations

import time

from worker.billing.pricing import charge_micro
from worker.billing.store.records import LedgerEntry
from worker.gateway.context import Principal, RequestContext, Usage


def ledger_entry(
    ctx: RequestContext, principal: Principal | None, *, worker_id: str, gpu_uuids: tuple[str, ...],
    charged: bool = True,
) -> LedgerEntry:
    """The ledger's account of a finished request: who, what, where, how much and how fast.

    `charged=False`: the request is recorded at no cost (the worker could not account for it).
    """
    usage = ctx.usage or Usage()
    finished = ctx.finished_monotonic or time.monotonic()
    ttft = ctx.first_byte_monotonic - ctx.started_monotonic if ctx.first_byte_monotonic else None
    status = ctx.status_code or (499 if ctx.outcome == "client_disconnected" else 0)
    return LedgerEntry(
        record_id=ctx.record_id,
        request_id=ctx.request_id,
        worker_id=worker_id,
        key_id=principal.key_id if principal else None,
        account_id=principal.account_id if principal else None,
        model=ctx.model.id,
        endpoint=ctx.endpoint,
        replica_id=ctx.replica.replica_id if ctx.replica is not None else None,
        gpu_uuids=gpu_uuids,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        usage_estimated=ctx.usage_estimated,
        cost_micro=(charge_micro(ctx.model, ctx.endpoint, ctx.usage, ctx.finish_reason, ctx.outcome)
                    if charged else 0),
        status_code=status,
        outcome=ctx.outcome,
        finish_reason=ctx.finish_reason,
        stream=ctx.stream,
        received_at=ctx.received_at,
        ttft_ms=round(ttft * 1000, 3) if ttft is not None else None,
        duration_ms=round((finished - ctx.started_monotonic) * 1000, 3),
        prompt_tokens_source=usage.prompt_source if ctx.usage is not None else "none",
        completion_tokens_source=usage.completion_source if ctx.usage is not None else "none",
        gpu_seconds=ctx.gpu_seconds or 0.0,
    )
