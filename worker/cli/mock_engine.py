"""`worker mock-engine`: run the CPU mock engine for one model (what `serve --engine mock` starts)."""

from __future__ import annotations

import argparse

from worker.config import ConfigError, ModelConfig, load_node_config
from worker.logs import configure_logging


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("mock-engine", help="run the CPU mock engine (vLLM's HTTP API, simulated)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-json", help="the model's models.yaml entry as JSON")
    source.add_argument("--model", help="id of a model in --config")
    parser.add_argument("--config", default="models.yaml", help="models.yaml to read --model from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--kv-events-port", type=int, default=None,
                        help="publish KV-cache events on this port (overrides the model's mock.kv_events_port)")
    parser.add_argument("--kv-events-replay-port", type=int, default=None,
                        help="answer KV-event replay requests on this port (mock.kv_events_replay_port)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("warning")
    if args.model_json:
        model = ModelConfig.model_validate_json(args.model_json)
    else:
        found = load_node_config(args.config).model(args.model)
        if found is None:
            raise ConfigError(f"{args.config}: no model with id '{args.model}'")
        model = found
    overrides = {name: getattr(args, name) for name in ("kv_events_port", "kv_events_replay_port")
                 if getattr(args, name) is not None}
    if overrides:
        mock = type(model.mock).model_validate({**model.mock.model_dump(), **overrides})
        model = model.model_copy(update={"mock": mock})
    from worker.engines.mock import run_mock_engine

    run_mock_engine(model, args.host, args.port)
    return 0
