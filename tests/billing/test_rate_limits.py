"""Token-bucket RPM/TPM limits on a fake clock, and OpenAI's rate-limit header values."""

from __future__ import annotations

import pytest

from worker.billing.ratelimit import RateLimiter, format_reset
from worker.token_bucket import retry_after_header


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_burst_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    decisions = [limiter.acquire("k", rpm=3, tpm=None, tokens=10) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    refused = decisions[-1]
    assert refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(20.0)  # one request per 20 s at 3 RPM
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in refused.headers
    clock.now += 20
    assert limiter.acquire("k", rpm=3, tpm=None, tokens=10).allowed


def test_keys_have_separate_buckets() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.acquire("a", rpm=1, tpm=None, tokens=1).allowed
    assert not limiter.acquire("a", rpm=1, tpm=None, tokens=1).allowed
    assert limiter.acquire("b", rpm=1, tpm=None, tokens=1).allowed


def test_tokens_per_minute_with_correction_after_the_fact() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    first = limiter.acquire("k", rpm=None, tpm=1000, tokens=600)
    assert first.allowed
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    refused = limiter.acquire("k", rpm=None, tpm=1000, tokens=600)
    assert not refused.allowed and refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(12.0)  # 200 tokens short at 1000/60 per second
    # The first request really used 100 tokens: 500 come back.
    limiter.correct_tokens("k", estimated=600, actual=100)
    assert limiter.acquire("k", rpm=None, tpm=1000, tokens=600).allowed


def test_a_request_larger_than_the_bucket_passes_when_full_and_leaves_a_debt() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    assert limiter.acquire("k", rpm=None, tpm=100, tokens=500).allowed
    refused = limiter.acquire("k", rpm=None, tpm=100, tokens=1)
    assert not refused.allowed
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_refund_returns_what_a_refused_request_took() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.acquire("k", rpm=1, tpm=None, tokens=1).allowed
    limiter.refund("k", requests=1, tokens=1)
    assert limiter.acquire("k", rpm=1, tpm=None, tokens=1).allowed


def test_a_changed_limit_takes_effect() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.acquire("k", rpm=1, tpm=None, tokens=1).allowed
    assert limiter.acquire("k", rpm=5, tpm=None, tokens=1).allowed


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.017, "17ms"),
        (0.0001, "1ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (59.9999, "1m0s"),
    ],
)
def test_reset_durations_look_like_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(12.01) == "13"
