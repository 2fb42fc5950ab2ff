"""`worker economics`: what each model earned against what its GPUs cost, from the billing database."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from worker.billing.store import LedgerStore
from worker.cli.store_command import database_options, store_handler
from worker.config import Settings, load_node_config
from worker.economics import compute
from worker.economics.options import BadOption, target_margin, window
from worker.economics.render import as_csv, as_json, as_table
from worker.economics.report import economics_report, economics_timeline


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "economics", parents=[database_options()], help="revenue against GPU cost, per model and for the node",
        description="Revenue, attributed and provisioned GPU time, utilisation, GPU cost, margin and "
        "break-even prices of a window, from the usage ledger and the replicas' up-time.",
        epilog=compute.DEFINITIONS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--since", help="ISO 8601 date or time, UTC unless it says otherwise (default: the "
                        "start of the current month)")
    parser.add_argument("--until", help="ISO 8601 date or time, exclusive (default: now)")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--worker", help="only this worker id's requests and replicas (default: every worker "
                        "recording into the database)")
    parser.add_argument("--target-margin", metavar="M", help="also the token prices that make margin / revenue "
                        "= M (0 <= M < 1) at the observed token mix")
    parser.add_argument("--plot", metavar="FILE.png", type=Path,
                        help="also draw revenue against GPU cost and utilisation over time into this PNG")
    parser.add_argument("--config", type=Path, help="models.yaml with the prices (default: WORKER_CONFIG)")
    parser.set_defaults(handler=store_handler(_economics))


async def _economics(store: LedgerStore, args: argparse.Namespace) -> int:
    config = load_node_config(args.config or Settings.from_env().config)
    try:
        since, until = window(args.since, args.until, datetime.now(UTC))
        margin = target_margin(args.target_margin)
    except BadOption as bad:
        print(f"worker economics: --{bad.option.replace('_', '-')}: {bad.message}", file=sys.stderr)
        return 2
    report = await economics_report(store, config, since, until, model=args.model, worker_id=args.worker,
                                    target_margin=margin)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(as_json(report), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(as_csv(report) if args.format == "csv" else as_table(report))
    sys.stdout.flush()
    if args.plot is not None:
        from worker.economics.plot import build_figure, save_png  # matplotlib: loaded only to draw

        models, points = await economics_timeline(store, config, since, until, model=args.model,
                                                  worker_id=args.worker)
        save_png(build_figure(models, points, since, until), args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
