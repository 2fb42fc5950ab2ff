"""Start every replica, watch it, restart it with backoff when it dies, stop them all on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from functools import partial

import httpx

from worker.config import ConfigError, EngineKind, NodeConfig, Settings
from worker.engines.base import EngineExited, PortInUse, ReplicaSpec
from worker.engines.factory import create_engine
from worker.engines.process_tree import end_processes, leftover_processes
from worker.engines.replica import Replica, ReplicaState
from worker.processes.supervisor import ChildSupervisor, Ended, RestartPolicy, RunEnd

logger = logging.getLogger(__name__)

HEALTH_POLL_INTERVAL_S = 0.5
QUARANTINE_CHECK_S = 1.0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def plan_replicas(config: NodeConfig, gpu_count: int) -> list[ReplicaSpec]:
    """Assign ports and GPUs (without overlap) to every replica of every model."""
    if config.gpus_needed > gpu_count > 0:
        raise ConfigError(f"models.yaml: models need {config.gpus_needed} GPUs but this node has {gpu_count}")
    worker = config.worker
    next_port = worker.engine_port_start
    next_gpu = 0
    next_spare_gpu = config.gpus_needed
    specs: list[ReplicaSpec] = []
    for model in config.models:
        for index in range(model.replicas):
            gpu_ids: tuple[int, ...] = ()
            if model.engine is EngineKind.vllm and gpu_count > 0:
                gpu_ids = tuple(range(next_gpu, next_gpu + model.gpus_per_replica))
                next_gpu += model.gpus_per_replica
            elif model.engine is EngineKind.mock and next_spare_gpu + model.gpus_per_replica <= gpu_count:
                # Mock replicas take the GPUs no vLLM replica needs, so a GPU node can be simulated.
                gpu_ids = tuple(range(next_spare_gpu, next_spare_gpu + model.gpus_per_replica))
                next_spare_gpu += model.gpus_per_replica
            if model.engine is EngineKind.external:
                port = 0
            elif next_port is not None:
                port, next_port = next_port, next_port + 1
            else:
                port = _free_port(worker.engine_host)
            specs.append(ReplicaSpec(model=model, index=index, host=worker.engine_host, port=port, gpu_ids=gpu_ids))
    return specs


class EngineSupervisor:
    def __init__(self, config: NodeConfig, settings: Settings, *, gpu_count: int) -> None:
        self.config = config
        self.settings = settings
        self.gpu_count = gpu_count
        self.replicas: list[Replica] = [
            Replica(create_engine(spec, settings, config.worker, gpu_present=gpu_count > 0))
            for spec in plan_replicas(config, gpu_count)
        ]
        self.by_model: dict[str, list[Replica]] = {}
        for replica in self.replicas:
            self.by_model.setdefault(replica.model_id, []).append(replica)
        policy = RestartPolicy.of(config.worker)
        self._supervisors = [ChildSupervisor(replica.replica_id, partial(self._run_once, replica), policy)
                             for replica in self.replicas]
        self._stopping = False
        self.state_changed = asyncio.Event()

    def replica(self, replica_id: str) -> Replica | None:
        return next((r for r in self.replicas if r.replica_id == replica_id), None)

    async def start(self) -> None:
        await self.end_leftover_engines()
        for supervisor in self._supervisors:
            supervisor.start()

    async def end_leftover_engines(self) -> None:
        """End engine processes whose worker is gone (a worker or guard killed before it could stop them):
        they hold GPU memory and ports that this worker's replicas need."""
        leftovers = await asyncio.to_thread(leftover_processes)
        if not leftovers:
            return
        grace = self.config.worker.engine_stop_timeout_s
        pids = await asyncio.to_thread(end_processes, [found.process for found in leftovers], grace)
        logger.warning("ended engine processes left behind by a previous worker", extra={
            "pids": pids, "replicas": sorted({found.marker.replica for found in leftovers}),
            "worker_pids": sorted({found.marker.owner_pid for found in leftovers})})

    async def wait_all_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(r.state is ReplicaState.ready for r in self.replicas):
                return True
            await asyncio.sleep(0.1)
        return False

    def _set_state(self, replica: Replica, state: ReplicaState) -> None:
        replica.set_state(state)
        self.state_changed.set()
        self.state_changed = asyncio.Event()

    async def restart(self, replica: Replica, reason: str) -> None:
        """Take a replica out of service now and let its supervisor start it again."""
        logger.warning("restarting replica", extra={"replica": replica.replica_id, "reason": reason})
        self._set_state(replica, ReplicaState.restarting)
        # Its requests end now (streams with the router's error chunk), not when the engine finally exits.
        replica.interrupt_requests(f"engine replica {replica.replica_id} is restarting: {reason}")
        await replica.engine.stop(self.config.worker.engine_stop_timeout_s)

    async def quarantine_gpu(self, gpu_index: int, reason: str) -> None:
        """Take every replica on a failed GPU out of service for good."""
        for replica in self.replicas:
            if gpu_index in replica.spec.gpu_ids and replica.quarantine_reason is None:
                replica.quarantine_reason = reason
                logger.error("replica quarantined", extra={"replica": replica.replica_id, "reason": reason})
                self._set_state(replica, ReplicaState.unhealthy)
                replica.interrupt_requests(f"engine replica {replica.replica_id} was taken out of service: {reason}")
                await replica.engine.stop(self.config.worker.engine_stop_timeout_s)

    async def _run_once(self, replica: Replica) -> Ended:
        """Start the replica's engine, serve it while it is healthy, and return once its guard has exited."""
        worker = self.config.worker
        if replica.quarantine_reason is not None:
            self._set_state(replica, ReplicaState.unhealthy)
            await asyncio.sleep(QUARANTINE_CHECK_S)
            return Ended(RunEnd.held)
        self._set_state(replica, ReplicaState.starting)
        started_at = time.monotonic()
        try:
            try:
                await replica.engine.start()
            except PortInUse as busy:
                # Not restarted blindly: a second server on the port would fail, and health checks
                # would be answered by whoever holds it.
                replica.port_holder = busy
                self._set_state(replica, ReplicaState.port_in_use)
                return Ended(RunEnd.refused, partial(self._port_in_use, replica, busy))
            replica.port_holder = None
            exit_task = asyncio.create_task(replica.engine.wait_exit())
            healthy = await self._wait_healthy(replica, exit_task, worker.engine_start_timeout_s)
            if healthy:
                await self._read_version(replica)
                self._set_state(replica, ReplicaState.ready)
                logger.info("replica ready", extra={"replica": replica.replica_id,
                                                    "startup_s": round(time.monotonic() - started_at, 2)})
            else:
                logger.error("replica did not become healthy in time",
                             extra={"replica": replica.replica_id, "timeout_s": worker.engine_start_timeout_s})
                await replica.engine.stop(worker.engine_stop_timeout_s)
            exited = await exit_task
            # Whatever ended the guard, nothing of its engine tree may outlive it.
            await replica.engine.stop(worker.engine_stop_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken launch must not take the worker down
            logger.exception("replica launch failed", extra={"replica": replica.replica_id})
            await replica.engine.stop(worker.engine_stop_timeout_s)
            exited = None
        if self._stopping:
            self._set_state(replica, ReplicaState.stopped)
            return Ended(RunEnd.exited)
        if replica.quarantine_reason is not None:
            return Ended(RunEnd.held)
        replica.last_exit = exited
        replica.restarts += 1
        self._set_state(replica, ReplicaState.restarting)
        return Ended(RunEnd.exited, partial(self._exited, replica, exited))

    @staticmethod
    def _port_in_use(replica: Replica, busy: PortInUse, delay_s: float) -> None:
        logger.error("replica port is in use by another process; retrying after backoff", extra={
            "replica": replica.replica_id, "port": busy.port, "holder_pid": busy.holder_pid,
            "holder_name": busy.holder_name, "backoff_s": delay_s})

    @staticmethod
    def _exited(replica: Replica, exited: EngineExited | None, delay_s: float) -> None:
        logger.error("replica exited; restarting after backoff", extra={
            "replica": replica.replica_id, "returncode": exited.returncode if exited else None,
            "backoff_s": delay_s, "output_tail": exited.output_tail[-2000:] if exited else None})

    async def _read_version(self, replica: Replica) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            response = await replica.client.get("/version", timeout=5.0)
            if response.status_code == 200:
                replica.engine.version = f"{replica.engine.kind} {response.json()['version']}"

    async def _wait_healthy(self, replica: Replica, exit_task: asyncio.Task[EngineExited], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        health_path = "/v1/models" if replica.engine.kind == "external" else "/health"
        while time.monotonic() < deadline:
            if exit_task.done():
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await replica.client.get(health_path, timeout=5.0)
                if response.status_code == 200:
                    return True
            await asyncio.wait({exit_task}, timeout=HEALTH_POLL_INTERVAL_S)
        return False

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*(supervisor.stop() for supervisor in self._supervisors))
        timeout = self.config.worker.engine_stop_timeout_s
        await asyncio.gather(*(r.engine.stop(timeout) for r in self.replicas), return_exceptions=True)
        for replica in self.replicas:
            replica.set_state(ReplicaState.stopped)
            await replica.aclose()
