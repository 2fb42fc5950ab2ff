"""The billing hook on the request path: authenticate, limit, reserve before; record and charge after.

Provenance headers and `usage.cost` are the `DisclosureHook`'s (worker/billing/disclosure.py), which runs
ahead of this one and also without the ledger. Keys are looked up by `KeyAuthenticator`
(authentication.py); the worker id is held by `WorkerIdClaim` (claim.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from worker.billing.authentication import KeyAuthenticator
from worker.billing.claim import ClaimTiming, WorkerIdClaim
from worker.billing.money import micro_to_usd_text
from worker.billing.outbox import UsageOutbox
from worker.billing.pricing import RequestShape, charge_micro, worst_case_micro
from worker.billing.provenance import ProvenanceSource
from worker.billing.ratelimit import RateLimiter
from worker.billing.store import DuplicateRecordId, LedgerStore, open_store
from worker.billing.store.records import ApiKey, LedgerEntry, Reservation, ReserveOutcome, utc_month
from worker.gateway.context import Principal, RequestContext, RequestView, Usage
from worker.gateway.hooks import ObservingHook
from worker.refusals import (
    BillingUnavailable,
    InsufficientBalance,
    InvalidKey,
    ModelNotAllowed,
    RateLimited,
    Refusal,
    SpendCapReached,
    WorkerIdTakenOver,
)

if TYPE_CHECKING:
    from worker.config import NodeConfig, Settings

logger = logging.getLogger(__name__)

# A reservation this old belongs to a worker that died and never came back; no request runs this long.
STALE_RESERVATION_S = 6 * 3600
UNAVAILABLE_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class BillingBacklog:
    ledger_writes_queued: int
    outbox_pending: int | None  # None: no usage webhook configured
    reservations_held: int


class BillingService(ObservingHook):
    def __init__(
        self,
        *,
        store: LedgerStore,
        worker_id: str,
        auth_required: bool,
        provenance: ProvenanceSource,
        outbox: UsageOutbox | None = None,
        claim: WorkerIdClaim | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.auth_required = auth_required
        self.outbox = outbox
        # Read once per request for the ledger: pass a cached source (ProvenanceCache), not a builder.
        self._provenance = provenance
        self._limiter = RateLimiter()
        self._held = 0
        self._background: set[asyncio.Task[bool]] = set()
        self.keys = KeyAuthenticator(store)
        self.claim = claim or WorkerIdClaim(store, worker_id, ClaimTiming())

    @classmethod
    async def open(
        cls,
        settings: Settings,
        node_config: NodeConfig,
        provenance: ProvenanceSource,
        claim_timing: ClaimTiming | None = None,
    ) -> BillingService:
        worker_id = node_config.worker.id
        store = await open_store(settings.db_url, sqlite_synchronous=settings.db_synchronous)
        claim = WorkerIdClaim(store, worker_id, claim_timing or ClaimTiming())
        try:
            await claim.acquire()
            await store.start_journal(worker_id)
            # Whatever this worker held before a crash or restart will never be settled.
            released = await store.release_reservations(worker_id, older_than=time.time() - STALE_RESERVATION_S)
            if released:
                logger.warning("released reservations of unfinished requests", extra={"count": released})
            outbox = None
            if settings.usage_webhook_url is not None:
                token = settings.usage_webhook_token.get_secret_value() if settings.usage_webhook_token else None
                outbox = UsageOutbox(store, worker_id, str(settings.usage_webhook_url), token=token)
                await outbox.start()
        except BaseException:
            await store.close()
            raise
        if not settings.auth:
            logger.warning("API keys are switched off: every request is served and recorded without a key")
        service = cls(store=store, worker_id=worker_id, auth_required=settings.auth, provenance=provenance,
                      outbox=outbox, claim=claim)
        claim.start_renewing()
        return service

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.outbox is not None:
            await self.outbox.close()
        await self.claim.stop_renewing()
        await self.store.flush()  # before the claim goes: the next holder of the id settles what is left
        await self.claim.release()
        await self.store.close()

    def backlog(self) -> BillingBacklog:
        return BillingBacklog(
            ledger_writes_queued=self.store.pending_writes,
            outbox_pending=self.outbox.pending if self.outbox is not None else None,
            reservations_held=self._held,
        )

    # The request hook.
    async def before_request(self, ctx: RequestContext, request: RequestView) -> None:
        """Authenticate, check the key's model and rate limits, reserve the worst-case cost; raises the
        Refusal that declines the request (the rate-limit headers are on `ctx` either way)."""
        if self.claim.lost:
            raise WorkerIdTakenOver("this worker's id is now used by another worker; it takes no more requests",
                                    retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        if not self.auth_required:
            return
        key = await self._authenticate_for(ctx, request)
        if not key.allows_model(ctx.model.id):
            raise ModelNotAllowed(f"this API key may not use model '{ctx.model.id}'")
        shape = RequestShape.of(ctx.endpoint, ctx.body, ctx.max_tokens)
        rate_tokens = shape.likely_tokens(ctx.model.max_model_len)
        decision = self._limiter.acquire(
            key.id, rpm=key.limits.requests_per_minute, tpm=key.limits.tokens_per_minute, tokens=rate_tokens
        )
        ctx.response_headers.update(decision.headers)
        if not decision.allowed:
            raise RateLimited(f"rate limit reached: {decision.limited_by} per minute for this API key; "
                              "retry after the time in the Retry-After header",
                              retry_after_s=max(1, math.ceil(decision.retry_after_s)))
        amount = worst_case_micro(ctx.model, shape)
        now = time.time()
        reservation = Reservation(record_id=ctx.record_id, account_id=key.account_id, key_id=key.id,
                                  amount_micro=amount, holder=self.worker_id, month=utc_month(now), created_at=now)
        try:
            outcome = await self.store.reserve(reservation)
        except asyncio.CancelledError:
            # The request is abandoned and will never be finalized: do not leave its money held.
            self._forget_reservation(ctx.record_id)
            raise
        except Exception as error:  # noqa: BLE001  any store failure: refused as unavailable, never served unbilled
            self._limiter.refund(key.id, requests=1, tokens=rate_tokens)
            logger.error("cannot reserve balance", extra={**_ids(ctx), "error": repr(error)})
            raise _billing_unavailable() from None
        if outcome is not ReserveOutcome.reserved:
            self._limiter.refund(key.id, requests=1, tokens=rate_tokens)
            if outcome is ReserveOutcome.key_revoked:
                self.keys.forget(key.key_hash)
            raise _refusal(outcome, amount, key)
        ctx.principal = Principal(account_id=key.account_id, key_id=key.id, byok=key.byok,
                                  tokens_per_minute=key.limits.tokens_per_minute, reserved_micro=amount,
                                  rate_tokens=rate_tokens)
        # Queued requests take turns by account: more keys buy an account no larger share of a model.
        ctx.flow, ctx.priority = key.account_id, key.priority
        self._held += 1

    def _forget_reservation(self, record_id: str) -> None:
        task = asyncio.create_task(self.store.release_reservation(record_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]:
        principal = ctx.principal
        return {"is_byok": True} if principal is not None and principal.byok else {}

    async def finalize(self, ctx: RequestContext) -> None:
        try:
            await self._finalize(ctx)
        except Exception:
            logger.exception("billing finalize failed", extra=_ids(ctx))

    async def _finalize(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        try:
            gpu_uuids = self._provenance(ctx.replica).gpu_uuids if ctx.replica is not None else ()
            entry = ledger_entry(ctx, principal, worker_id=self.worker_id, gpu_uuids=gpu_uuids)
        except Exception:
            # Still record the request and give its hold back: charged nothing, as the worker's failure.
            logger.exception("cannot account for a request; recording it as the worker's failure",
                             extra=_ids(ctx))
            ctx.outcome, ctx.usage = "worker_error", None
            ctx.status_code = max(ctx.status_code, 500)
            entry = ledger_entry(ctx, principal, worker_id=self.worker_id, gpu_uuids=(), charged=False)
        if principal is not None:
            self._held -= 1
            if principal.tokens_per_minute:
                actual = entry.prompt_tokens + entry.completion_tokens
                self._limiter.correct_tokens(principal.key_id, estimated=principal.rate_tokens, actual=actual)
        try:
            settled = await self.store.settle_soon(entry)
        except Exception as error:  # noqa: BLE001  the hold stays until the next restart settles the journal
            _log_unsettled(error, entry)
            return
        if settled.done():  # settled already (no journal): report it now, not on a later turn of the loop
            self._on_settled(entry, settled)
        else:
            settled.add_done_callback(partial(self._on_settled, entry))

    def _on_settled(self, entry: LedgerEntry, settled: asyncio.Future[int]) -> None:
        error = settled.exception()
        if error is not None:
            _log_unsettled(error, entry)
        elif self.outbox is not None:
            self.outbox.notify()

    async def _authenticate_for(self, ctx: RequestContext, request: RequestView) -> ApiKey:
        try:
            return await self.keys.authenticate(request.headers, recent_ok=True)
        except InvalidKey:
            raise
        except Exception as error:  # noqa: BLE001  any store failure: refused as unavailable, never served unbilled
            logger.error("cannot look up API key", extra={**_ids(ctx), "error": repr(error)})
            raise _billing_unavailable() from None


def _log_unsettled(error: BaseException, entry: LedgerEntry) -> None:
    ids = {"record_id": entry.record_id, "request_id": entry.request_id}
    if isinstance(error, DuplicateRecordId):
        logger.error("this request was settled already; not recorded or charged again", extra=ids)
    else:
        # The reservation stays held (so the balance errs on the safe side) until the next restart,
        # which also settles what the journal kept.
        logger.error("ledger write failed", extra={**ids, "error": repr(error), "cost_micro": entry.cost_micro})


def _ids(ctx: RequestContext) -> dict[str, str]:
    return {"record_id": ctx.record_id, "request_id": ctx.request_id}


def _billing_unavailable() -> BillingUnavailable:
    """The store could not be reached: refuse honestly and early rather than serve unbilled."""
    return BillingUnavailable("billing is temporarily unavailable; retry shortly",
                              retry_after_s=UNAVAILABLE_RETRY_AFTER_S)


def _refusal(outcome: ReserveOutcome, amount_micro: int, key: ApiKey) -> Refusal:
    if outcome is ReserveOutcome.insufficient_balance:
        return InsufficientBalance(
            f"insufficient balance: this request may cost up to {micro_to_usd_text(amount_micro)} USD "
            "(prompt plus max_tokens at this model's prices); top up the account or lower max_tokens")
    if outcome is ReserveOutcome.spend_cap_reached:
        cap = key.limits.monthly_spend_cap_micro or 0
        return SpendCapReached(
            f"this API key's monthly spend cap of {micro_to_usd_text(cap)} USD cannot cover this request "
            f"(up to {micro_to_usd_text(amount_micro)} USD)")
    return InvalidKey("this API key has been revoked")


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
