"""A token bucket that refills continuously, for limits counted per minute (API keys' rate limits, failed
admin logins)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(capacity=per_minute, per_second=per_minute / 60.0, level=per_minute, updated=now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.per_second)

    def until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.per_second)


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
