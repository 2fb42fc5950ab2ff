"""Entry point of the `worker` console script."""

from __future__ import annotations

import argparse
import sys

from worker import __version__
from worker.cli import doctor, economics, keys, mock_engine, models, serve, usage
from worker.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description="GPU inference worker node")
    parser.add_argument("--version", action="version", version=f"worker {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (serve, mock_engine, models, doctor, keys, usage, economics):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except ConfigError as error:
        print(f"worker: configuration error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
