"""`worker serve`: run the gateway and supervise the engines of models.yaml."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from worker.config import EngineKind, NodeConfig, Settings, load_node_config, with_engine_override
from worker.logs import configure_logging

logger = logging.getLogger("worker.serve")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the worker before the server stops.

    uvicorn's own handling closes the listening socket at once; here it stays open while draining, so
    new requests get a clean 503 instead of a refused connection. A second signal cuts the drain's
    grace period short; a third exits without waiting for anything.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._signals = 0
        self._hurry = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: it would also re-raise the signal after shutdown (exit status -15).
        # A signal handler only hands over to the event loop.
        self._signals += 1
        if self._loop is None or not self.started or self._signals >= 3:
            self.should_exit = True
            self.force_exit = self._signals >= 3
        else:
            self._loop.call_soon_threadsafe(self._on_signal, sig, self._signals)

    def _on_signal(self, sig: int, count: int) -> None:
        logger.warning("shutdown signal received", extra={"signal": signal.Signals(sig).name, "count": count})
        if count == 1:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(), name="drain")
        else:
            self._hurry.set()

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain(self._hurry)
        except Exception:
            logger.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True


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

    from worker.gateway.http_limits import LimitedConfig, ensure_open_files
    from worker.gateway.processes.coordinator import GatewaySockets
    from worker.node import WorkerNode

    ensure_open_files(config.worker.http)  # relay processes inherit the raised limit
    host, port = config.worker.host, config.worker.port
    # Several gateway processes: they accept on the port, this process serves them on a Unix socket.
    try:
        sockets = GatewaySockets.open(host, port) if config.worker.gateway_processes > 1 else None
    except OSError as error:
        logger.error("cannot listen on the worker's port", extra={"host": host, "port": port, "error": str(error)})
        return 1
    try:
        node = WorkerNode(config, settings, gpu_count=inventory.count, gateway_sockets=sockets)
        # The drain has already ended every request when uvicorn shuts down; its own wait is only a backstop.
        server = DrainingServer(LimitedConfig(
            node.app, limits=config.worker.http, host=host, port=port, loop="uvloop",
            access_log=False, log_config=None, timeout_graceful_shutdown=5, lifespan="on",
        ), drain=node.drain)
        logger.info("listening", extra={"host": host, "port": port,
                                        "gateway_processes": config.worker.gateway_processes})
        server.run(sockets=None if sockets is None else [sockets.internal])
    finally:
        if sockets is not None:
            sockets.close()
    return 0
