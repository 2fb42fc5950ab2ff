"""Child processes that run one of the worker's own functions in a fresh Python interpreter.

A fresh interpreter rather than a fork of the worker (which would copy its threads' locks mid-use) or
multiprocessing's start methods (which re-run the parent's main script in the child).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

logger = logging.getLogger(__name__)


async def start_python(entry: str, *args: str, pass_fds: tuple[int, ...]) -> asyncio.subprocess.Process:
    """`python -c entry args...`, with the worker's import path and the given file descriptors."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", entry, *args, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


async def wait_or_kill(process: asyncio.subprocess.Process, timeout_s: float, what: str) -> None:
    """Wait for a child asked to exit; kill it if it has not within `timeout_s`."""
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        logger.error("%s did not exit; killing it", what, extra={"pid": process.pid})
        process.kill()
        await process.wait()
