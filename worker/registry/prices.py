"""Prices as routers read them: decimal strings in USD per ONE token (or request), exact, never floats."""

from __future__ import annotations

from decimal import Decimal

from worker.config import Pricing


def usd_text(amount: Decimal) -> str:
    """'0.00000013', '2', '0': plain notation, no exponent, no trailing zeros, never '-0'."""
    if not amount.is_finite():
        raise ValueError(f"not a price: {amount}")
    if amount.is_zero():
        return "0"
    # Formatting, unlike normalize() or arithmetic, never rounds to the context's 28 digits.
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def per_token(per_million: Decimal) -> str:
    """USD per million tokens -> USD per token, by moving the exponent: exact for any number of digits."""
    sign, digits, exponent = per_million.as_tuple()
    if not per_million.is_finite() or not isinstance(exponent, int):
        raise ValueError(f"not a price: {per_million}")
    return usd_text(Decimal((sign, digits, exponent - 6)))


def token_prices(pricing: Pricing) -> dict[str, str]:
    """Per-token prices by OpenRouter's legacy keys; `input_cache_read` only when a cached price is set.

    No `input_cache_write`: the worker bills tokens written to the prefix cache at the prompt price.
    """
    prices = {
        "prompt": per_token(pricing.prompt_per_mtok),
        "completion": per_token(pricing.completion_per_mtok),
    }
    if pricing.cached_prompt_per_mtok is not None:
        prices["input_cache_read"] = per_token(pricing.cached_prompt_per_mtok)
    prices["image"] = "0"  # images reach the model as prompt tokens and are billed as such
    prices["request"] = usd_text(pricing.request)
    return prices
