"""The report's options as an operator writes them (CLI flags, /admin/economics query parameters), checked
once for both: each bad value names its option."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import NamedTuple


class BadOption(ValueError):
    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class Window(NamedTuple):
    since: datetime
    until: datetime  # exclusive


def parse_moment(option: str, text: str) -> datetime:
    """An ISO 8601 date (midnight UTC) or time (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadOption(option, f"not an ISO 8601 date or time: {text!r}") from None
    if len(text) <= 10:  # a bare date
        moment = datetime.combine(date.fromisoformat(text), time(), UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window(since: str | None, until: str | None, now: datetime) -> Window:
    """Default: the current calendar month (UTC) up to now; --since alone ends now, --until alone starts at
    the start of its month."""
    end = parse_moment("until", until) if until else now.astimezone(UTC)
    start = parse_moment("since", since) if since else month_start(end if until else now)
    if start >= end:
        raise BadOption("since", f"{start.isoformat()} is not before until ({end.isoformat()})")
    return Window(start, end)


def target_margin(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        margin = Decimal(text)
    except InvalidOperation:
        raise BadOption("target_margin", f"not a number: {text!r}") from None
    if not margin.is_finite() or not 0 <= margin < 1:
        raise BadOption("target_margin", f"must be at least 0 and below 1 (a share of revenue), not {text}")
    return margin
