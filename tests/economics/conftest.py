"""Economics fixtures: the billing store fixtures (an empty store on SQLite and on PostgreSQL)."""

from tests.billing.conftest import db_url, store

__all__ = ["db_url", "store"]
