"""One way to keep a child process running: run it, and when it ends run it again after a backoff.

Engines (engines/supervisor.py) and relay processes (gateway/processes/coordinator.py) are kept by a
`ChildSupervisor` under one `RestartPolicy`, taken from `worker.restart_backoff_initial_s` and
`restart_backoff_max_s`: the delay doubles with each failure in a row, up to the maximum, and a child
that stayed up `stable_after_s` starts the count again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker.config import WorkerSection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    initial_s: float
    max_s: float
    stable_after_s: float = 60.0  # a child up this long has its backoff reset

    @classmethod
    def of(cls, worker: WorkerSection) -> RestartPolicy:
        return cls(initial_s=worker.restart_backoff_initial_s, max_s=worker.restart_backoff_max_s)

    def delay_s(self, failures: int) -> float:
        """The wait before the next start after `failures` (1 or more) failures in a row."""
        return float(min(self.initial_s * 2 ** (failures - 1), self.max_s))


class Restarts:
    """One child's failures in a row, under a policy."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def after_exit(self, up_s: float) -> float:
        """The child ran for `up_s` and ended: the wait before it starts again."""
        self.failures = 1 if up_s > self.policy.stable_after_s else self.failures + 1
        return self.policy.delay_s(self.failures)

    def after_refused_start(self) -> float:
        """The child could not start at all: the wait before it is tried again."""
        self.failures += 1
        return self.policy.delay_s(self.failures)


class RunEnd(enum.Enum):
    exited = "exited"  # it ran and ended: restarted after the policy's delay
    refused = "refused"  # it could not start: tried again after the policy's delay
    held = "held"  # it is not to run now (its owner took it out of service): asked again at once


@dataclass
class Ended:
    """How one run of a child ended, and what its owner does once the wait before the next is known."""

    how: RunEnd
    restarting: Callable[[float], None] | None = None


class ChildSupervisor:
    """Keeps one child running: `run_once()` starts it and returns when it has ended (or could not start);
    the supervisor waits the policy's delay and runs it again, until `stop()`."""

    def __init__(self, name: str, run_once: Callable[[], Awaitable[Ended]], policy: RestartPolicy) -> None:
        self.name = name
        self._run_once = run_once
        self.restarts = Restarts(policy)
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_running(), name=f"supervise-{self.name}")

    async def _keep_running(self) -> None:
        while not self.stopping:
            started = time.monotonic()
            try:
                ended = await self._run_once()
            except Exception:  # a fault in one run must not end the child's supervision
                logger.exception("cannot run a child process; trying again after backoff", extra={"child": self.name})
                ended = Ended(RunEnd.refused)
            if self.stopping:
                return
            if ended.how is RunEnd.held:
                continue
            if ended.how is RunEnd.refused:
                delay = self.restarts.after_refused_start()
            else:
                delay = self.restarts.after_exit(time.monotonic() - started)
            if ended.restarting is not None:
                ended.restarting(delay)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop restarting the child (the caller stops the child itself) and wait for the loop to end."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
