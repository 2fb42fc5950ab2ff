"""`worker models`: the model listing routers will see, computed from models.yaml alone (no engines started).

`is_ready` is left out of the OpenRouter formats: only a running worker knows it. `context_length` is
models.yaml's `max_model_len`; a running worker shows the limit its engines report.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from worker.config import Settings, load_node_config
from worker.registry.listing import ModelCatalog

FORMATS = ("openrouter", "openrouter-v2.4", "openai")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("models", help="print the model listing of models.yaml (OpenRouter or OpenAI)")
    parser.add_argument("--config", help="path to models.yaml (env WORKER_CONFIG)")
    parser.add_argument("--format", choices=FORMATS, default="openrouter",
                        help="openrouter: GET /v1/models (OpenAI fields plus OpenRouter's legacy provider fields); "
                             "openrouter-v2.4: GET /openrouter/models (nested schema 2.4); openai: OpenAI fields only")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(**({"config": args.config} if args.config else {}))
    catalog = ModelCatalog(load_node_config(settings.config), readiness=None)
    listing = {"openrouter": catalog.listing, "openrouter-v2.4": catalog.listing_v24,
               "openai": catalog.openai_listing}[args.format]()
    sys.stdout.write(orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
