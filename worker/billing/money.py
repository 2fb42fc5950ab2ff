"""Money is integer micro-USD everywhere it is stored; Decimal where it is computed; never float."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation

from worker.billing.store.records import MICROS_PER_USD

_ONE_MICRO = Decimal("0.000001")


def usd_to_micro(amount: Decimal | str | int) -> int:
    """Exact conversion of a USD amount given by a person (top-up, cap); refuses fractions of a micro-USD."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise ValueError(f"not a USD amount: {amount!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a USD amount: {amount!r}")
    try:
        micro = value * MICROS_PER_USD
    except ArithmeticError:  # an exponent past Decimal's range: no amount anyone meant
        raise ValueError(f"not a USD amount: {amount!r}") from None
    if micro != micro.to_integral_value():
        raise ValueError(f"{amount} USD is not a whole number of micro-USD (at most 6 decimals)")
    return int(micro)


def micro_to_usd(micro: int) -> Decimal:
    return (Decimal(micro) / MICROS_PER_USD).quantize(_ONE_MICRO)


def micro_to_usd_text(micro: int) -> str:
    """'12.345678' — how money travels in JSON bodies, CSV and the CLI."""
    return str(micro_to_usd(micro))


def micro_to_json_number(micro: int) -> float:
    """Only for OpenAI's `usage.cost`, which clients read as a JSON number."""
    return float(micro_to_usd(micro))


def round_usd_to_micro(amount: Decimal) -> int:
    """A computed charge: half-up to the nearest micro-USD."""
    return int((amount * MICROS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def ceil_usd_to_micro(amount: Decimal) -> int:
    """A worst-case bound: always up, so the bound never falls below a real charge."""
    return int((amount * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))
