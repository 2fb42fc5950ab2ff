"""Engine processes as the kernel sees them: who carries an engine marker, and who listens on a port.

Read straight from /proc with psutil (not with the worker's own sweep code), so tests that assert
"nothing was left behind" do not trust the code they test.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import psutil

MARKER_ENV = "WORKER_ENGINE_MARKER"


@dataclass(frozen=True)
class MarkedProcess:
    pid: int
    name: str
    marker: dict[str, object]


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def marked_processes() -> list[MarkedProcess]:
    """Every live process of this user whose environment carries an engine marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get(MARKER_ENV)
            if value and alive(proc):
                found.append(MarkedProcess(proc.pid, proc.name(), json.loads(value)))
        except psutil.Error:
            continue
    return found


def listeners(port: int) -> set[int]:
    """Pids listening on a TCP port."""
    return {conn.pid for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid}


def process_group(pgid: int) -> list[psutil.Process]:
    """Live processes in a process group (an engine tree keeps its guard's group)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and alive(proc):
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return members
