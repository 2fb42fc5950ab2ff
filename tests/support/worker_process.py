"""Start a real `worker serve` process for integration tests and stop it without leaving anything behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import uvicorn
import yaml
from starlette.types import ASGIApp


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll until `predicate()` holds; False if it never did within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> bool:
    """`wait_until` for an async check, without blocking the event loop between polls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int = 0) -> AsyncIterator[str]:
    """Serve an app in this process on 127.0.0.1 and yield its base URL; `port` 0 takes a free one, a fixed
    port lets a replacement server take it over."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.05)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{bound_port}"
    finally:
        server.should_exit = True
        await task


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_descendants(self) -> list[psutil.Process]:
        """The engines' processes: every descendant but the billing database's and the gateway's."""
        return [proc for proc in self.descendants()
                if not _is_billing_database(proc) and not _is_gateway_process(proc)]

    def gateway_processes(self) -> list[psutil.Process]:
        """The relay processes that serve the port when `worker.gateway_processes` is above 1."""
        return [proc for proc in self.descendants() if _is_gateway_process(proc)]

    def billing_database_processes(self) -> list[psutil.Process]:
        """The process that runs the worker's SQLite work (none with the ledger off or on PostgreSQL)."""
        return [proc for proc in self.descendants() if _is_billing_database(proc)]

    def engine_ports(self, model_id: str | None = None) -> list[int]:
        """Loopback ports of the engine replicas (read from their command lines)."""
        ports = []
        for proc in self.descendants():
            try:
                cmd = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "worker.engines.guard" in cmd:
                continue
            if "--port" in cmd and ("mock-engine" in cmd or "vllm" in " ".join(cmd)):
                if model_id is not None and model_id not in " ".join(cmd):
                    continue
                ports.append(int(cmd[cmd.index("--port") + 1]))
        return sorted(set(ports))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout_s}s:\n{self.log()[-5000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def ready_or_stopped(proc: WorkerProcess, also: Callable[[], bool] | None = None) -> WorkerProcess:
    """`proc` once it is ready (and `also()` holds); stopped, and the error raised, if it never gets there."""
    try:
        proc.wait_ready()
        if also is not None and not wait_until(also):
            raise TimeoutError(f"the worker got ready but not to {also.__name__}:\n{proc.log()[-5000:]}")
    except BaseException:
        proc.stop()
        raise
    return proc


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _runs(proc: psutil.Process, module: str) -> bool:
    try:
        return module in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return False


def _is_billing_database(proc: psutil.Process) -> bool:
    return _runs(proc, "worker.billing.store.sqlite_server")


def _is_gateway_process(proc: psutil.Process) -> bool:
    return _runs(proc, "worker.relay_entry")


def start_worker(tmp_path: Path, config: dict, *, engine: str = "mock", env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> WorkerProcess:
    port = free_port()
    config = {**config, "worker": {**config["worker"], "port": port, "host": "127.0.0.1"}}
    config_path = write_config(tmp_path / "models.yaml", config)
    log_path = tmp_path / "worker.log"
    full_env = {**os.environ, "WORKER_AUTH": "false", "WORKER_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
                **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--config", str(config_path), "--engine", engine,
         *(extra_args or [])],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path,
    )
    return WorkerProcess(process=process, port=port, log_path=log_path, env=full_env)


def fast_mock_model(model_id: str, **overrides: object) -> dict:
    model = {
        "id": model_id,
        "engine": "mock",
        "source": f"local/{model_id}",
        "replicas": 1,
        "engine_args": {"max_model_len": 512, "max_num_seqs": 16},
        "pricing": {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"},
        "mock": {"step_base_ms": 1.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
    }
    model.update(overrides)
    return model


@contextlib.contextmanager
def serving_in_thread(app: ASGIApp) -> Iterator[str]:
    """Serve an app on 127.0.0.1 from a thread (for code under test that calls it synchronously) and yield
    its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
