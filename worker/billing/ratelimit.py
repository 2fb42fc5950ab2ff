"""Per-key requests-per-minute and tokens-per-minute limits, with OpenAI's `x-ratelimit-*` headers.

Token buckets that refill continuously: a key with 60 RPM may burst 60 requests, then gets one more per
second. Tokens are debited up front from an estimate (prompt plus `max_tokens`) and corrected when the
real count is known. The buckets live in this process: with several workers each enforces its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.token_bucket import TokenBucket

_PRUNE_ABOVE = 10_000


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float
    headers: dict[str, str]
    limited_by: str | None = None  # "requests" or "tokens" when refused


def format_reset(seconds: float) -> str:
    """OpenAI's reset durations: '17ms', '1s', '6m0s', '1h2m3.5s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    total = round(seconds, 3)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}s"
    if minutes:
        return f"{int(minutes)}m{text}s"
    return f"{text}s"


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, key_id: str, kind: str, per_minute: int, now: float) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None or bucket.capacity != per_minute:  # new key, or its limit changed
            bucket = TokenBucket.full(per_minute, now)
            self._buckets[(key_id, kind)] = bucket
        else:
            bucket.refill(now)
        return bucket

    def acquire(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int) -> RateDecision:
        """Admit one request estimated at `tokens`, or say how long to wait. Never blocks."""
        now = self._clock()
        if len(self._buckets) > _PRUNE_ABOVE:
            self._prune(now)
        requests = self._bucket(key_id, "requests", rpm, now) if rpm else None
        token_bucket = self._bucket(key_id, "tokens", tpm, now) if tpm else None
        # A request larger than the whole bucket may pass when the bucket is full, then leaves a debt.
        token_need = min(tokens, token_bucket.capacity) if token_bucket else 0
        waits = {
            "requests": requests.wait_for(1) if requests else 0.0,
            "tokens": token_bucket.wait_for(token_need) if token_bucket else 0.0,
        }
        limited_by = max(waits, key=lambda kind: waits[kind]) if max(waits.values()) > 0 else None
        if limited_by is None:
            if requests:
                requests.level -= 1
            if token_bucket:
                token_bucket.level -= tokens
        return RateDecision(
            allowed=limited_by is None,
            retry_after_s=max(waits.values()),
            headers=_headers(requests, token_bucket),
            limited_by=limited_by,
        )

    def refund(self, key_id: str, *, requests: int, tokens: int) -> None:
        """Give back what an admitted request took when it was refused later (e.g. no balance)."""
        self._credit(key_id, "requests", requests)
        self._credit(key_id, "tokens", tokens)

    def correct_tokens(self, key_id: str, *, estimated: int, actual: int) -> None:
        self._credit(key_id, "tokens", estimated - actual)

    def _credit(self, key_id: str, kind: str, amount: int) -> None:
        bucket = self._buckets.get((key_id, kind))
        if bucket is not None and amount:
            bucket.refill(self._clock())
            bucket.level = min(bucket.capacity, bucket.level + amount)

    def _prune(self, now: float) -> None:
        # A full bucket carries no state: forgetting it changes nothing.
        for name, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.level >= bucket.capacity:
                del self._buckets[name]


def _headers(requests: TokenBucket | None, tokens: TokenBucket | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(bucket.until_full())
    return headers
