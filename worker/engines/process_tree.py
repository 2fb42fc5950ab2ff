"""Find and end an engine's processes wherever they went, and find who holds an engine's port.

Every engine launch carries a marker in its environment (`WORKER_ENGINE_MARKER`, set by the worker for
its engines; not a setting). Children inherit it and it survives re-parenting to init and `setsid`, so
the worker finds a launch's processes by marker as well as by process group, and at start-up finds the
processes of launches whose worker is gone. Everything here blocks on /proc: call it from a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import psutil
from pydantic import BaseModel, ConfigDict, ValidationError

ENGINE_MARKER_ENV = "WORKER_ENGINE_MARKER"
# vLLM renames its engine processes (VLLM::EngineCore, VLLM::Worker) with setproctitle, which overwrites
# /proc/PID/environ, and with it the marker, unless this is set.
KEEP_ENVIRON_READABLE = {"SPT_NOENV": "1"}
# Seconds between looks while waiting for ended processes to go.
_POLL_S = 0.1


class EngineMarker(BaseModel):
    """Which worker process started an engine launch, for which replica."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    worker_id: str
    replica: str
    owner_pid: int
    # The owner's start time (psutil create_time): a pid reused by another process is not the owner.
    owner_started: float
    launch: str

    @classmethod
    def for_launch(cls, worker_id: str, replica: str) -> EngineMarker:
        me = psutil.Process()
        return cls(worker_id=worker_id, replica=replica, owner_pid=me.pid, owner_started=me.create_time(),
                   launch=uuid.uuid4().hex)

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, value: str) -> EngineMarker | None:
        try:
            return cls.model_validate_json(value)
        except ValidationError:
            return None

    def owner_alive(self) -> bool:
        try:
            owner = psutil.Process(self.owner_pid)
            return owner.status() != psutil.STATUS_ZOMBIE and _same_start(owner.create_time(), self.owner_started)
        except psutil.NoSuchProcess:
            return False

    def owned_by_this_process(self) -> bool:
        return self.owner_pid == os.getpid() and self.owner_alive()


@dataclass(frozen=True)
class MarkedProcess:
    process: psutil.Process
    marker: EngineMarker


@dataclass(frozen=True)
class PortHolder:
    """What listens on a port: pid and name when this user may see them, the marker when it is an engine."""

    pid: int | None
    name: str | None
    marker: EngineMarker | None


def _same_start(a: float, b: float) -> bool:
    return abs(a - b) < 0.05


def marker_of(process: psutil.Process) -> EngineMarker | None:
    try:
        value = process.environ().get(ENGINE_MARKER_ENV)
    except psutil.Error:  # gone, a zombie, or another user's
        return None
    return EngineMarker.decode(value) if value else None


def _others() -> Iterable[psutil.Process]:
    me = os.getpid()
    return (proc for proc in psutil.process_iter() if proc.pid != me)


def marked_processes() -> list[MarkedProcess]:
    """Every process (of this user) that carries an engine marker."""
    found = []
    for proc in _others():
        marker = marker_of(proc)
        if marker is not None:
            found.append(MarkedProcess(proc, marker))
    return found


def launch_processes(launch: str, process_group: int | None) -> list[psutil.Process]:
    """The live processes of one launch: those in its process group and those that carry its marker."""
    found = []
    for proc in _others():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if process_group is not None and os.getpgid(proc.pid) == process_group:
                found.append(proc)
                continue
        marker = marker_of(proc)
        if marker is not None and marker.launch == launch:
            found.append(proc)
    return found


def leftover_processes() -> list[MarkedProcess]:
    """Engine processes whose worker is gone: nobody supervises them any more."""
    return [found for found in marked_processes() if not found.marker.owner_alive()]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(procs: Iterable[psutil.Process], kill: bool) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill() if kill else proc.terminate()


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    # psutil.wait_procs would wait for a zombie that is not our child to be reaped by its parent.
    deadline = time.monotonic() + timeout_s
    alive = [proc for proc in procs if _alive(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        alive = [proc for proc in alive if _alive(proc)]
    return alive


def end_processes(procs: list[psutil.Process], grace_s: float) -> list[int]:
    """SIGTERM every process, SIGKILL those still there after `grace_s`; the pids that were alive."""
    targets = [proc for proc in procs if _alive(proc)]
    if not targets:
        return []
    _signal_all(targets, kill=False)
    stubborn = _wait_gone(targets, grace_s)
    if stubborn:
        _signal_all(stubborn, kill=True)
        _wait_gone(stubborn, 5.0)
    return [proc.pid for proc in targets]


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on `host:port` now, or None when it could."""
    # SO_REUSEADDR as uvicorn binds: connections in TIME_WAIT do not count, a listener does.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error
    return None


def _port_free(host: str, port: int) -> bool:
    error = bind_error(host, port)
    if error is not None and error.errno != errno.EADDRINUSE:
        raise error
    return error is None


def port_holder(host: str, port: int) -> PortHolder | None:
    """None when `host:port` can be bound; else who listens on it, as far as this user can see."""
    if _port_free(host, port):
        return None
    # A listener on the wildcard address holds the port on every address.
    addresses = {host, "0.0.0.0", "::", f"::ffff:{host}"}
    for conn in psutil.net_connections(kind="tcp"):
        if (conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port
                or conn.laddr.ip not in addresses or conn.pid is None):
            continue
        try:
            proc = psutil.Process(conn.pid)
            return PortHolder(pid=proc.pid, name=proc.name(), marker=marker_of(proc))
        except psutil.NoSuchProcess:
            continue
    return PortHolder(pid=None, name=None, marker=None)
