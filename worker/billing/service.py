"""The billing hooks on the request path: authenticate, limit, reserve before; record and charge after.

Provenance headers and `usage.cost` are the `DisclosureHook`'s (worker/billing/disclosure.py), which runs
ahead of this one and also without the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import psutil
import uuid_utils
from fastapi import APIRouter
from pydantic import SecretStr
from starlette.requests import Request

from worker.billing.keys import hash_api_key, hashes_match, looks_like_api_key, presented_api_key
from worker.billing.metering import Principal, ledger_entry
from worker.billing.money import micro_to_usd_text
from worker.billing.outbox import UsageOutbox
from worker.billing.pricing import RequestShape, worst_case_micro
from worker.billing.provenance import ProvenanceSource
from worker.billing.ratelimit import RateLimiter, retry_after_header
from worker.billing.records import ApiKey, LedgerEntry, Reservation, ReserveOutcome, WorkerClaim, utc_month
from worker.billing.store import DuplicateRecordId, LedgerStore, open_store
from worker.gateway.context import RequestContext
from worker.gateway.errors import ApiError

if TYPE_CHECKING:
    from worker.config import NodeConfig, Settings

logger = logging.getLogger(__name__)

# A reservation this old belongs to a worker that died and never came back; no request runs this long.
STALE_RESERVATION_S = 6 * 3600
# How long an inference request may use a key looked up earlier. Revocation and the spend cap still act
# on the next request: the reservation re-checks both in its own transaction. Other edits (allowed
# models, limits, expiry) made elsewhere show within this time.
KEY_CACHE_TTL_S = 2.0
KEY_CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class ClaimTiming:
    """How a worker keeps its worker id to itself in a shared database (see `claim_worker_id`)."""

    renew_s: float = 10.0
    # A holder not heard from for this long has stopped (killed, or its node gone): its id is free.
    stale_s: float = 30.0
    retry_s: float = 1.0


class WorkerIdInUse(RuntimeError):
    """Another running worker holds this worker id in the same database."""


@dataclass(frozen=True)
class BillingBacklog:
    ledger_writes_queued: int
    outbox_pending: int | None  # None: no usage webhook configured
    reservations_held: int


_REFUSALS: dict[ReserveOutcome, tuple[int, str | None]] = {
    ReserveOutcome.insufficient_balance: (402, "insufficient_quota"),
    ReserveOutcome.spend_cap_reached: (402, "spend_cap_reached"),
    ReserveOutcome.key_revoked: (401, "invalid_api_key"),
}


class BillingService:
    def __init__(
        self,
        *,
        store: LedgerStore,
        worker_id: str,
        auth_required: bool,
        provenance: ProvenanceSource,
        outbox: UsageOutbox | None = None,
        admin_token: SecretStr | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
        instance_id: str | None = None,
        claim_timing: ClaimTiming | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.auth_required = auth_required
        self.outbox = outbox
        # Read once per request for the ledger: pass a cached source (ProvenanceCache), not a builder.
        self._provenance = provenance
        self._admin_token = admin_token
        self._limiter = limiter or RateLimiter()
        self._clock = clock
        self._held = 0
        self._background: set[asyncio.Task[bool]] = set()
        # key hash -> (key, when it was read): spares each request a database round trip before the engine.
        self._recent_keys: dict[str, tuple[ApiKey, float]] = {}
        # key hash -> the database read in flight for it: a burst of requests with one key reads it once.
        self._key_reads: dict[str, asyncio.Future[ApiKey | None]] = {}
        self.instance_id = instance_id
        self._claim_timing = claim_timing or ClaimTiming()
        self._claim_renewal: asyncio.Task[None] | None = None
        # Another worker took this worker id over: it may release the holds made in the id's name.
        self.claim_lost = False
        self._claim_lost_callbacks: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    async def open(
        cls,
        settings: Settings,
        node_config: NodeConfig,
        provenance: ProvenanceSource,
        claim_timing: ClaimTiming | None = None,
    ) -> BillingService:
        worker_id = node_config.worker.id
        timing = claim_timing or ClaimTiming()
        instance_id = uuid_utils.uuid7().hex
        store = await open_store(settings.db_url, sqlite_synchronous=settings.db_synchronous)
        try:
            await _claim_worker_id(store, worker_id, instance_id, timing)
            await store.start_journal(worker_id)
            # Whatever this worker held before a crash or restart will never be settled.
            released = await store.release_reservations(
                worker_id, older_than=time.time() - STALE_RESERVATION_S
            )
            if released:
                logger.warning("released reservations of unfinished requests", extra={"count": released})
            outbox = None
            if settings.usage_webhook_url is not None:
                token = (
                    settings.usage_webhook_token.get_secret_value() if settings.usage_webhook_token else None
                )
                outbox = UsageOutbox(store, worker_id, str(settings.usage_webhook_url), token=token)
                await outbox.start()
        except BaseException:
            await store.close()
            raise
        if not settings.auth:
            logger.warning("API keys are switched off: every request is served and recorded without a key")
        service = cls(
            store=store,
            worker_id=worker_id,
            auth_required=settings.auth,
            provenance=provenance,
            outbox=outbox,
            admin_token=settings.admin_token,
            instance_id=instance_id,
            claim_timing=timing,
        )
        service._claim_renewal = asyncio.create_task(service._renew_claim(), name="billing-worker-claim")
        return service

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.outbox is not None:
            await self.outbox.close()
        if self._claim_renewal is not None:
            self._claim_renewal.cancel()
            await asyncio.gather(self._claim_renewal, return_exceptions=True)
        await self.store.flush()  # before the claim goes: the next holder of the id settles what is left
        if self.instance_id is not None:
            try:  # the next worker with this id may start at once
                await self.store.release_worker_claim(self.worker_id, self.instance_id)
            except Exception as error:
                logger.warning("cannot release the worker id's claim", extra={"error": repr(error)})
        await self.store.close()

    async def _renew_claim(self) -> None:
        assert self.instance_id is not None
        while True:
            await asyncio.sleep(self._claim_timing.renew_s)
            try:
                held = await self.store.renew_worker_claim(self.worker_id, self.instance_id, self._clock())
            except Exception as error:  # the database is unreachable for now; the next round tries again
                logger.warning("cannot renew the worker id's claim", extra={"error": repr(error)})
                continue
            if not held:
                logger.error(
                    "another worker took over this worker id after this one went unheard for "
                    f"{self._claim_timing.stale_s:g} s; refusing requests from now on, since the other "
                    "worker may release the balance held for them; give each worker its own worker.id",
                    extra={"worker_id": self.worker_id},
                )
                await self.mark_claim_lost()
                return

    def when_claim_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` once this worker id is found taken over (the node drains on it)."""
        self._claim_lost_callbacks.append(callback)

    async def mark_claim_lost(self) -> None:
        """From now on refuse requests (503 worker_id_taken_over), and tell whoever asked to be told."""
        if self.claim_lost:
            return
        self.claim_lost = True
        for callback in self._claim_lost_callbacks:
            try:
                await callback()
            except Exception:
                logger.exception("worker id takeover callback failed")

    def backlog(self) -> BillingBacklog:
        return BillingBacklog(
            ledger_writes_queued=self.store.pending_writes,
            outbox_pending=self.outbox.pending if self.outbox is not None else None,
            reservations_held=self._held,
        )

    # Authentication, shared with the key holder's API.
    async def authenticate(self, headers: Mapping[str, str], *, recent_ok: bool = False) -> ApiKey:
        """The key the request presents, or the 401 that refuses it.

        `recent_ok`: a key read in the last KEY_CACHE_TTL_S will do (for inference requests, whose
        reservation re-checks revocation); the key holder's own API always reads it afresh.
        """
        presented = presented_api_key(headers)
        if presented is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not looks_like_api_key(presented):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        presented_hash = hash_api_key(presented)
        now = self._clock()
        key = self._recent_key(presented_hash, now) if recent_ok else None
        if key is None:
            key = await (self._shared_key_read(presented_hash) if recent_ok
                         else self.store.find_key_by_hash(presented_hash))
            if key is not None and key.revoked_at is None:
                self._remember_key(presented_hash, key, now)
        if key is None or not hashes_match(key.key_hash, presented_hash):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if key.revoked_at is not None:
            raise ApiError(401, "this API key has been revoked", code="invalid_api_key")
        if key.is_expired(now):
            raise ApiError(401, "this API key has expired", code="invalid_api_key")
        return key

    async def _shared_key_read(self, key_hash: str) -> ApiKey | None:
        read = self._key_reads.get(key_hash)
        if read is None:
            read = asyncio.ensure_future(self.store.find_key_by_hash(key_hash))
            self._key_reads[key_hash] = read
            read.add_done_callback(lambda _: self._key_reads.pop(key_hash, None))
        # Shielded: a client that hangs up must not cancel the read the others wait for.
        return await asyncio.shield(read)

    def _recent_key(self, key_hash: str, now: float) -> ApiKey | None:
        entry = self._recent_keys.get(key_hash)
        if entry is None or now - entry[1] > KEY_CACHE_TTL_S or now < entry[1]:
            return None
        return entry[0]

    def _remember_key(self, key_hash: str, key: ApiKey, now: float) -> None:
        if len(self._recent_keys) >= KEY_CACHE_MAX_ENTRIES:
            self._recent_keys.clear()  # many distinct keys at once: start over rather than track ages
        self._recent_keys[key_hash] = (key, now)

    # The request hooks.
    async def before_request(self, ctx: RequestContext, request: Request) -> None:
        if self.claim_lost:
            raise _refusal(ctx, 503, "this worker's id is now used by another worker; it takes no more "
                           "requests", "worker_id_taken_over", {"retry-after": "5"})
        if not self.auth_required:
            return
        key = await self._authenticate_for(ctx, request)
        if not key.allows_model(ctx.model.id):
            raise _refusal(ctx, 403, f"this API key may not use model '{ctx.model.id}'", "model_not_allowed")
        shape = RequestShape.of(ctx.endpoint, ctx.body, ctx.max_tokens)
        rate_tokens = shape.likely_tokens(ctx.model.max_model_len)
        decision = self._limiter.acquire(
            key.id, rpm=key.limits.requests_per_minute, tpm=key.limits.tokens_per_minute, tokens=rate_tokens
        )
        ctx.response_headers.update(decision.headers)
        if not decision.allowed:
            raise _refusal(
                ctx,
                429,
                f"rate limit reached: {decision.limited_by} per minute for this API key; "
                "retry after the time in the Retry-After header",
                "rate_limit_exceeded",
                {"retry-after": retry_after_header(decision.retry_after_s)},
            )
        amount = worst_case_micro(ctx.model, shape)
        now = self._clock()
        reservation = Reservation(
            record_id=ctx.record_id,
            account_id=key.account_id,
            key_id=key.id,
            amount_micro=amount,
            holder=self.worker_id,
            month=utc_month(now),
            created_at=now,
        )
        try:
            outcome = await self.store.reserve(reservation)
        except asyncio.CancelledError:
            # The request is abandoned and will never be finalized: do not leave its money held.
            self._forget_reservation(ctx.record_id)
            raise
        except Exception as error:
            self._limiter.refund(key.id, requests=1, tokens=rate_tokens)
            logger.error("cannot reserve balance", extra={**_ids(ctx), "error": repr(error)})
            raise _billing_unavailable(ctx) from None
        if outcome is not ReserveOutcome.reserved:
            self._limiter.refund(key.id, requests=1, tokens=rate_tokens)
            if outcome is ReserveOutcome.key_revoked:
                self._recent_keys.pop(key.key_hash, None)
            status, code = _REFUSALS[outcome]
            raise _refusal(ctx, status, _refusal_message(outcome, amount, key), code)
        ctx.principal = Principal(key=key, reserved_micro=amount, rate_tokens=rate_tokens)
        # Queued requests take turns by account: more keys buy an account no larger share of a model.
        ctx.flow, ctx.priority = key.account_id, key.priority
        self._held += 1

    def _forget_reservation(self, record_id: str) -> None:
        task = asyncio.create_task(self.store.release_reservation(record_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def after_route(self, ctx: RequestContext) -> None:
        return None

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]:
        principal = ctx.principal
        if isinstance(principal, Principal) and principal.key.byok:
            return {"is_byok": True}
        return {}

    async def finalize(self, ctx: RequestContext) -> None:
        try:
            await self._finalize(ctx)
        except Exception:
            logger.exception("billing finalize failed", extra=_ids(ctx))

    async def _finalize(self, ctx: RequestContext) -> None:
        principal = ctx.principal if isinstance(ctx.principal, Principal) else None
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
            if principal.key.limits.tokens_per_minute:
                actual = entry.prompt_tokens + entry.completion_tokens
                self._limiter.correct_tokens(principal.key.id, estimated=principal.rate_tokens, actual=actual)
        try:
            settled = await self.store.settle_soon(entry)
        except Exception as error:
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

    async def _authenticate_for(self, ctx: RequestContext, request: Request) -> ApiKey:
        try:
            return await self.authenticate(request.headers, recent_ok=True)
        except ApiError as error:
            error.headers = {**ctx.response_headers, **error.headers}
            raise
        except Exception as error:
            logger.error("cannot look up API key", extra={**_ids(ctx), "error": repr(error)})
            raise _billing_unavailable(ctx) from None

    # HTTP APIs.
    def key_router(self) -> APIRouter:
        from worker.billing.key_api import build_key_router

        return build_key_router(self)

    def admin_router(self) -> APIRouter:
        from worker.billing.admin_api import build_admin_router

        return build_admin_router(self.store, self._admin_token)


async def _claim_worker_id(store: LedgerStore, worker_id: str, instance_id: str, timing: ClaimTiming) -> None:
    """Hold `worker_id` for this worker alone, waiting out the claim of one that stopped unannounced.

    Raises WorkerIdInUse when another worker keeps renewing it: two running workers with one id would
    release each other's balance holds at start-up and share one outbox cursor.
    """
    started = time.time()
    waited_for: str | None = None
    gone: str | None = None
    host, pid, process_started_at = socket.gethostname(), os.getpid(), psutil.Process().create_time()
    while True:
        now = time.time()
        holder = await store.claim_worker_id(
            WorkerClaim(worker_id=worker_id, instance_id=instance_id, host=host, pid=pid,
                        process_started_at=process_started_at, claimed_at=now, seen_at=now),
            stale_before=now - timing.stale_s,
            gone_instance=gone,
        )
        if holder is None:
            return
        if holder.host == host and not _process_runs(holder.pid, holder.process_started_at):
            gone = holder.instance_id  # e.g. this container before it restarted: no need to wait
            continue
        if now - started > timing.stale_s + timing.renew_s:
            raise WorkerIdInUse(
                f"worker.id '{worker_id}' is in use by another running worker on this billing database "
                f"(it renewed its claim {now - holder.seen_at:.0f} s ago); give each worker its own worker.id"
            )
        if waited_for != holder.instance_id:
            waited_for = holder.instance_id
            logger.warning(
                "worker.id is claimed by another worker; waiting for its claim to lapse",
                extra={"worker_id": worker_id, "seen_s_ago": round(now - holder.seen_at, 1),
                       "lapses_after_s": timing.stale_s},
            )
        await asyncio.sleep(timing.retry_s)


def _process_runs(pid: int, started_at: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started_at) < 0.05
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. not ours to inspect: assume it runs, and wait for its claim to lapse
        return True


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


def _billing_unavailable(ctx: RequestContext) -> ApiError:
    """The store could not be reached: refuse honestly and early rather than serve unbilled."""
    return _refusal(ctx, 503, "billing is temporarily unavailable; retry shortly", "billing_unavailable",
                    {"retry-after": "5"})


def _refusal(
    ctx: RequestContext,
    status: int,
    message: str,
    code: str | None,
    extra_headers: dict[str, str] | None = None,
) -> ApiError:
    return ApiError(status, message, code=code, headers={**ctx.response_headers, **(extra_headers or {})})


def _refusal_message(outcome: ReserveOutcome, amount_micro: int, key: ApiKey) -> str:
    if outcome is ReserveOutcome.insufficient_balance:
        return (
            f"insufficient balance: this request may cost up to {micro_to_usd_text(amount_micro)} USD "
            "(prompt plus max_tokens at this model's prices); top up the account or lower max_tokens"
        )
    if outcome is ReserveOutcome.spend_cap_reached:
        cap = key.limits.monthly_spend_cap_micro or 0
        return (
            f"this API key's monthly spend cap of {micro_to_usd_text(cap)} USD cannot cover this request "
            f"(up to {micro_to_usd_text(amount_micro)} USD)"
        )
    return "this API key has been revoked"
