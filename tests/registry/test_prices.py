"""Per-million prices become exact per-token decimal strings: no float error, no exponent, no stray zeros."""

from __future__ import annotations

import random
import re
from decimal import Decimal, localcontext

import pytest

from tests.registry.schemas import PRICE_PATTERN
from worker.config import Pricing
from worker.registry.prices import per_token, token_prices, usd_text

ONE_MILLION = Decimal(1_000_000)


@pytest.mark.parametrize(
    ("per_million", "expected"),
    [
        ("0.13", "0.00000013"),
        ("0.130", "0.00000013"),
        ("0.38", "0.00000038"),
        ("0.02", "0.00000002"),
        ("0", "0"),
        ("0.000", "0"),
        ("2", "0.000002"),
        ("15", "0.000015"),
        ("1000000", "1"),
        ("12500000", "12.5"),
        ("1E+3", "0.001"),
        ("0.1234567890123456789012345678901234", "0.0000001234567890123456789012345678901234"),
    ],
)
def test_known_conversions(per_million: str, expected: str) -> None:
    assert per_token(Decimal(per_million)) == expected


def test_random_prices_round_trip_exactly() -> None:
    rng = random.Random(20261101)
    pattern = re.compile(PRICE_PATTERN)
    for _ in range(2000):
        digits = rng.randint(0, 10 ** rng.randint(1, 34))
        exponent = rng.randint(-20, 8)
        per_million = Decimal(f"{digits}E{exponent}")
        text = per_token(per_million)
        assert pattern.fullmatch(text), text
        assert "e" not in text.lower()
        with localcontext() as context:
            context.prec = 100  # enough that the check itself does not round
            assert Decimal(text) * ONE_MILLION == per_million  # exact, at any number of digits


def test_yaml_floats_give_the_written_price() -> None:
    # YAML reads `0.1` as a binary float; the price must still be exactly 1e-7 per token.
    pricing = Pricing(prompt_per_mtok=0.1, completion_per_mtok=0.3)  # type: ignore[arg-type]
    assert token_prices(pricing)["prompt"] == "0.0000001"
    assert token_prices(pricing)["completion"] == "0.0000003"


def test_cache_read_price_only_when_configured() -> None:
    plain = token_prices(Pricing(prompt_per_mtok=Decimal("0.13"), completion_per_mtok=Decimal("0.38")))
    assert "input_cache_read" not in plain
    assert "input_cache_write" not in plain
    assert plain == {"prompt": "0.00000013", "completion": "0.00000038", "image": "0", "request": "0"}
    cached = token_prices(Pricing(prompt_per_mtok=Decimal("0.13"), completion_per_mtok=Decimal("0.38"),
                                  cached_prompt_per_mtok=Decimal("0.065"), request=Decimal("0.0010")))
    assert cached["input_cache_read"] == "0.000000065"
    assert cached["request"] == "0.001"  # per request: not divided


def test_negative_zero_and_non_finite() -> None:
    assert usd_text(Decimal("-0")) == "0"
    with pytest.raises(ValueError):
        usd_text(Decimal("NaN"))
    with pytest.raises(ValueError):
        per_token(Decimal("Infinity"))
