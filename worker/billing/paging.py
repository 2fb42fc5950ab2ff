"""Paging lists newest first: a page's `next_cursor` is the seq of its last item, validated on the way
back in."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from worker.gateway.errors import ApiError

# Seqs are BIGINT (PostgreSQL) / INTEGER (SQLite): signed 64-bit.
MAX_SEQ = 2**63 - 1
MAX_PAGE = 500

# Documented with its pattern; checked by `cursor_value`, which answers a friendlier 400 than the pattern's.
Cursor = Annotated[
    str | None,
    Query(description="next_cursor of the previous page", json_schema_extra={"pattern": r"^[0-9]{1,19}$"}),
]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page, at most {MAX_PAGE}")]


def cursor_value(cursor: str | None) -> int | None:
    """The seq a cursor stands for; 400 naming `cursor` for anything no page could have given."""
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > MAX_SEQ:
        raise ApiError(400, "invalid cursor: pass next_cursor from the previous page", param="cursor")
    return int(cursor)


def next_cursor(seqs: list[int], limit: int) -> str | None:
    """The cursor of the next page, None when this page was the last."""
    return str(seqs[-1]) if len(seqs) == limit else None
