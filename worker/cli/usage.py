"""`worker usage export`: the ledger as CSV or JSON lines, straight from the billing database."""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import UTC, datetime
from typing import TextIO

from worker.billing.export import export_lines
from worker.billing.store import LedgerStore
from worker.billing.store.records import LedgerFilter
from worker.cli.store_command import database_options, store_handler


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("usage", help="the usage ledger")
    commands = parser.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export", parents=[database_options()], help="export ledger records, oldest first"
    )
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    export.add_argument(
        "--since", type=_moment, help="ISO 8601 time (UTC unless it says otherwise), inclusive"
    )
    export.add_argument("--until", type=_moment, help="ISO 8601 time, exclusive")
    export.add_argument("--model", help="only this model")
    export.add_argument("--account", help="only this account")
    export.add_argument("--key", help="only this key id")
    export.add_argument("--request-id", help="only records with this x-request-id")
    export.add_argument("--output", "-o", help="write to this file instead of standard output")
    export.set_defaults(handler=store_handler(_export))


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _output(path: str) -> TextIO:
    # A command-line process: nothing else waits on its event loop, so plain file writes are fine.
    return open(path, "w", encoding="utf-8", newline="")


async def _export(store: LedgerStore, args: argparse.Namespace) -> int:
    where = LedgerFilter(
        since=args.since, until=args.until, model=args.model, account_id=args.account, key_id=args.key,
        request_id=args.request_id,
    )
    count = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_output(args.output)) if args.output else sys.stdout
        async for line in export_lines(store, where, args.format):
            out.write(line)
            count += 1
    records = count - 1 if args.format == "csv" else count
    print(f"exported {records} records", file=sys.stderr)
    return 0
