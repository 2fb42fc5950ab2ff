"""What `worker keys`, `worker usage` and `worker economics` share: the database option and running a command
on the store."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from worker.billing.store import LedgerStore, open_store
from worker.config import Settings

StoreCommand = Callable[[LedgerStore, argparse.Namespace], Awaitable[int]]


def database_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--db-url", help="billing database: sqlite:///PATH or postgresql://... (env WORKER_DB_URL)"
    )
    return parent


def store_handler(command: StoreCommand) -> Callable[[argparse.Namespace], int]:
    """Turn an async command on the store into an argparse handler returning the exit status."""

    def handler(args: argparse.Namespace) -> int:
        settings = Settings.from_env(**({"db_url": args.db_url} if args.db_url else {}))

        async def run() -> int:
            store = await open_store(settings.db_url, sqlite_synchronous=settings.db_synchronous)
            try:
                return await command(store, args)
            finally:
                await store.close()

        return asyncio.run(run())

    return handler
