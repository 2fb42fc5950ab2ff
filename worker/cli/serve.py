"""`worker serve`: run the gateway and supervise the engines of models.yaml."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from worker.config import EngineKind, NodeConfig, Settings, load_node_config, with_engine_override
from worker.logs import configure_logging

logger = logging.getLogger("worker.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the models of models.yaml")
    parser.add_argument("--config", help="path to models.yaml (env WORKER_CONFIG)")
    parser.add_argument("--engine", choices=["auto", "config", "mock"],
                        help="auto: as configured on a GPU node, CPU mock elsewhere (env WORKER_ENGINE)")
    parser.add_argument("--host", help="override worker.host")
    parser.add_argument("--port", type=int, help="override worker.port")
    parser.set_defaults(handler=run)


def resolve_engines(config: NodeConfig, engine_choice: str, gpu_count: int, no_gpu_reason: str) -> NodeConfig:
    if engine_choice == "mock":
        logger.info("serving every model on the CPU mock engine (--engine mock)")
        return with_engine_override(config, EngineKind.mock)
    needs_gpu = any(m.engine is EngineKind.vllm for m in config.models)
    if engine_choice == "auto" and needs_gpu and gpu_count == 0:
        logger.warning("no GPU found; serving vLLM models on the CPU mock engine with the same ids, limits "
                       "and prices", extra={"reason": no_gpu_reason})
        models = [m.model_copy(update={"engine": EngineKind.mock}) if m.engine is EngineKind.vllm else m
                  for m in config.models]
        return config.model_copy(update={"models": models})
    return config


def run(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in (("config", args.config), ("engine", args.engine)) if value}
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level)
    config = load_node_config(settings.config)
    worker_updates = {key: value for key, value in (("host", args.host), ("port", args.port)) if value}
    if worker_updates:
        config = config.model_copy(update={"worker": config.worker.model_copy(update=worker_updates)})

    from worker.gpu import detect_gpus

    inventory = detect_gpus()
    config = resolve_engines(config, settings.engine, inventory.count, inventory.reason or "")

    from worker.node import WorkerNode

    node = WorkerNode(config, settings, gpu_count=inventory.count)
    server = uvicorn.Server(uvicorn.Config(
        node.app, host=config.worker.host, port=config.worker.port, loop="uvloop", http="httptools",
        access_log=False, log_config=None, timeout_graceful_shutdown=None, lifespan="on",
    ))
    logger.info("listening", extra={"host": config.worker.host, "port": config.worker.port})
    server.run()
    return 0
