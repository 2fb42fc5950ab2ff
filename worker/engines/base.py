"""The one engine interface the gateway and supervisor use; vLLM, the mock and external URLs sit behind it."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

from worker.config import ModelConfig
from worker.engines.loading import LoadProgress


@dataclass(frozen=True)
class ReplicaSpec:
    """Where one replica of a model runs: its GPUs and its loopback address."""

    model: ModelConfig
    index: int
    host: str
    port: int
    gpu_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def replica_id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.id).strip("-")
        return f"{slug}-{self.index}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class EngineExited(Exception):
    """The engine process ended; `returncode` and the tail of its output explain why."""

    def __init__(self, returncode: int | None, output_tail: str) -> None:
        super().__init__(f"engine exited with status {returncode}")
        self.returncode = returncode
        self.output_tail = output_tail


class PortInUse(Exception):
    """The replica's port is held by a process the worker does not own; nothing was started."""

    def __init__(self, port: int, holder_pid: int | None, holder_name: str | None) -> None:
        super().__init__(f"port {port} is in use by " + (f"pid {holder_pid} ({holder_name})" if holder_pid
                                                         else "a process this user cannot see"))
        self.port = port
        self.holder_pid = holder_pid
        self.holder_name = holder_name


class Engine(abc.ABC):
    """One engine replica the gateway sends OpenAI-style HTTP requests to."""

    kind: str = "engine"

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        # "vllm 0.32.0": filled in from the engine's /version once it is healthy.
        self.version = self.kind
        # The last progress the engine reported while loading its model (engines that report none keep None).
        self.load_progress: LoadProgress | None = None

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @abc.abstractmethod
    async def start(self) -> None:
        """Launch the engine (returns once launched, not once healthy); `PortInUse` if its port is taken."""

    @abc.abstractmethod
    async def wait_exit(self) -> EngineExited:
        """Wait until the engine stops on its own; never returns for engines the worker does not own."""

    @abc.abstractmethod
    async def stop(self, timeout_s: float) -> None:
        """Stop the engine and everything it started, also after it exited on its own; idempotent."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None: ...

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "version": self.version, "pid": self.pid, "base_url": self.base_url,
                "gpus": list(self.spec.gpu_ids)}
