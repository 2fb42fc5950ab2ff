"""Who may use `/admin/*`: one check of the operator's bearer token for every admin router (billing's and
capacity's), and the record of what each admin request changed."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request

from worker.gateway.client_address import client_address
from worker.gateway.errors import ApiError
from worker.gateway.request_id import SCOPE_KEY
from worker.token_bucket import TokenBucket, retry_after_header

logger = logging.getLogger(__name__)

# Wrong admin tokens one client address may present per minute (a burst of this many, then one every
# 60/N s) before its attempts are refused with 429 unread: a 32-character token cannot be guessed at that
# rate.
ADMIN_FAILURES_PER_MINUTE = 10
# Addresses whose buckets are tracked at once before full (forgotten) buckets are dropped.
_PRUNE_ABOVE = 10_000


@dataclass(frozen=True)
class AdminChange:
    """One change an admin request made, for the audit trail."""

    at: float
    client: str
    request_id: str | None
    action: str
    target: str | None
    changes: dict[str, Any]


# Keeps an admin change (billing's audit table, or only the log while the ledger is off).
ChangeRecorder = Callable[[AdminChange], Awaitable[None]]


async def log_change(change: AdminChange) -> None:
    logger.info("admin action", extra={"action": change.action, "actor": "admin", "client": change.client,
                                       "request_id": change.request_id, "target": change.target,
                                       "changes": change.changes})


class AdminAccess:
    """A FastAPI dependency admitting only `Authorization: Bearer <admin token>`; one per worker.

    Without a configured token every admin route answers 503, so an unset token never means "open". Failed
    attempts are logged (client address and path, never what was presented) and limited per client address.
    """

    def __init__(
        self,
        admin_token: SecretStr | None,
        *,
        recorder: ChangeRecorder = log_change,
        failures_per_minute: int = ADMIN_FAILURES_PER_MINUTE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        secret = admin_token.get_secret_value() if admin_token is not None else ""
        self._expected = secret.encode() if secret else None
        self.recorder = recorder
        self._failures_per_minute = failures_per_minute
        self.clock = clock
        self._failures: dict[str, TokenBucket] = {}

    async def __call__(self, request: Request) -> None:
        if self._expected is None:
            raise ApiError(503, "admin API disabled: set WORKER_ADMIN_TOKEN to enable it", code="admin_disabled")
        client = client_address(request.scope)
        now = self.clock()
        bucket = self._failures.get(client)
        if bucket is not None:
            bucket.refill(now)
            if bucket.level < 1:
                raise ApiError(429, "too many failed admin attempts from this address", code="rate_limit_exceeded",
                               headers={"retry-after": retry_after_header(bucket.wait_for(1))})
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._expected):
            return
        self._count_failure(client, now)
        logger.warning("admin token refused", extra={"client": client, "path": request.url.path,
                                                     "request_id": request.scope.get(SCOPE_KEY)})
        raise ApiError(401, "missing or wrong admin token", code="invalid_admin_token",
                       headers={"www-authenticate": "Bearer"})

    def _count_failure(self, client: str, now: float) -> None:
        if len(self._failures) > _PRUNE_ABOVE:
            for address, bucket in list(self._failures.items()):
                bucket.refill(now)
                if bucket.level >= bucket.capacity:
                    del self._failures[address]
        bucket = self._failures.setdefault(client, TokenBucket.full(self._failures_per_minute, now))
        bucket.level -= 1
        if bucket.level < 1:
            logger.warning("admin attempts from this address refused for a while: too many wrong tokens",
                           extra={"client": client, "retry_after_s": round(bucket.wait_for(1), 1)})

    async def record(self, request: Request, action: str, target: str | None, changes: dict[str, Any]) -> None:
        """Keep what an admin request changed (see `recorder`)."""
        await self.recorder(AdminChange(at=time.time(), client=client_address(request.scope),
                                        request_id=request.scope.get(SCOPE_KEY), action=action, target=target,
                                        changes=changes))
