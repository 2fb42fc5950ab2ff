"""One worker node: the supervisor, the gateway and their services, wired together from configuration."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from worker import __version__
from worker.api import (
    AdminAccess,
    audit_recorder,
    build_admin_router,
    build_capacity_router,
    build_economics_router,
    build_key_router,
    build_listing_router,
)
from worker.billing.disclosure import DisclosureHook, ProvenanceCache
from worker.billing.pricing import charge_micro
from worker.billing.provenance import Provenance
from worker.billing.service import BillingService
from worker.capacity import CapacityMonitor, CapacityState
from worker.capacity.gpu_time import GpuTimeMeters
from worker.capacity.leasing import AdmissionLeaser
from worker.config import NodeConfig, Settings
from worker.economics.uptime import UptimeRecorder
from worker.engines.replica import Replica
from worker.engines.supervisor import EngineSupervisor
from worker.gateway.access_log import AccessLog
from worker.gateway.app import create_app
from worker.gateway.gateway import Gateway
from worker.gateway.pipeline import request_hooks
from worker.gateway.processes.coordinator import GatewayProcesses, GatewaySockets
from worker.gpu import GpuHealth, GpuHealthChange, GpuMetricsCollector, GpuMonitor
from worker.metrics import (
    BillingCollector,
    CapacityCollector,
    EconomicsCollector,
    EngineMetricsCollector,
    GatewayMetrics,
    GatewayProcessCollector,
    ReplicaCollector,
)
from worker.metrics.access import require_metrics_token
from worker.metrics.node_view import readings_from_watches, render_node_page
from worker.registry import (
    EngineContextLengths,
    ModelCatalog,
    RegistryClient,
    RegistryCollector,
    readiness_by_model,
)

logger = logging.getLogger(__name__)


class WorkerNode:
    def __init__(self, config: NodeConfig, settings: Settings, *, gpu_count: int,
                 gpu_monitor: GpuMonitor | None = None, gateway_sockets: GatewaySockets | None = None) -> None:
        self.config = config
        self.settings = settings
        self.started_at = int(time.time())
        self.supervisor = EngineSupervisor(config, settings, gpu_count=gpu_count)
        self.gpu_monitor = gpu_monitor or GpuMonitor()
        self.capacity = CapacityMonitor(config, self.supervisor.by_model, on_hung=self.supervisor.restart,
                                        gpu_snapshot=self.gpu_monitor.snapshot)
        self.billing: BillingService | None = None  # its store opens in start()
        self.uptime: UptimeRecorder | None = None  # replica up-time, kept in billing's database
        self.context_lengths = EngineContextLengths(self.supervisor.by_model)
        self.catalog = ModelCatalog(config, readiness=readiness_by_model(self.capacity.readiness),
                                    context_lengths=self.context_lengths, created=self.started_at)
        self.registration = RegistryClient.for_node(
            config, settings, version=__version__, started_at=self.started_at, listing=self.catalog.listing,
            capacity=lambda: self.capacity.document().model_dump(mode="json"), gpus=self.gpu_monitor.snapshot)

        self.registry = CollectorRegistry()
        self.registry.register(ReplicaCollector(self.supervisor.replicas, state_of=self.capacity.state_of,
                                                states=[s.value for s in CapacityState]))
        self.registry.register(GpuMetricsCollector(self.gpu_monitor))
        self.registry.register(CapacityCollector(self.capacity))
        self.registry.register(EngineMetricsCollector(self.capacity.engine_scrapes))
        self.registry.register(BillingCollector(lambda: self.billing.backlog() if self.billing else None))
        self.registry.register(RegistryCollector(self.registration))

        # Where each response ran and what it cost, with the ledger on or off.
        self.provenance_cache = ProvenanceCache(self.provenance, engine_version_of=lambda r: r.engine.version)
        self.gateway_metrics = GatewayMetrics(self.registry, charge_micro=lambda ctx: charge_micro(
            ctx.model, ctx.endpoint, ctx.usage, ctx.finish_reason, ctx.outcome))
        # Its hooks are set in start(), once billing's store is open (or known to be off).
        # Each replica's busy time and each request's share of it (ctx.gpu_seconds where the engine has no figure).
        self.gpu_time = GpuTimeMeters()
        self.registry.register(EconomicsCollector(config, self.supervisor.replicas,
                                                  busy_seconds=self.gpu_time.busy_seconds))
        self.gateway = Gateway(config, AdmissionLeaser(self.capacity.admission, self.gpu_time))
        self.app: FastAPI = create_app(self.gateway, lifespan=self._lifespan,
                                       models_listing=self.catalog.listing, readiness=self.readiness)
        # With several gateway processes, relays serve the port and this process decides for them.
        self.gateway_processes = None if gateway_sockets is None else GatewayProcesses(
            config, self.gateway, gateway_sockets, count=config.worker.gateway_processes,
            log_level=settings.log_level)
        if self.gateway_processes is not None:
            self.registry.register(GatewayProcessCollector(self.gateway_processes.describe))
        metrics_access = [Depends(require_metrics_token(settings.metrics_token))]
        self.app.add_api_route("/metrics", self.metrics, methods=["GET"], include_in_schema=False,
                               dependencies=metrics_access)
        self.app.add_api_route("/metrics/node", self.node_metrics, methods=["GET"], include_in_schema=False,
                               dependencies=metrics_access)
        # One admin token check for every /admin route: failed attempts count per address across them all.
        self.admin_access = AdminAccess(settings.admin_token, recorder=audit_recorder(None))
        self.app.include_router(build_capacity_router(self.capacity, self.admin_access, settings.metrics_token))
        self.app.include_router(build_listing_router(self.catalog))

    @asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        logger.info("worker starting", extra={"worker_id": self.config.worker.id, "version": __version__,
                                              "replicas": [r.replica_id for r in self.supervisor.replicas]})
        if self.settings.ledger:
            self.billing = await BillingService.open(self.settings, self.config, self.provenance_cache)
            self.billing.claim.when_lost(self._worker_id_taken_over)
            self.mount_billing_routes(self.billing)
            self.uptime = UptimeRecorder(self.billing.store, self.config.worker.id, self.supervisor.replicas,
                                         lambda: self.supervisor.state_changed)
        else:
            logger.warning("usage ledger off (WORKER_LEDGER=false): requests are served unrecorded")
        self.gateway.hooks = request_hooks(metrics=self.gateway_metrics, access_log=AccessLog(),
                                           disclosure=DisclosureHook(self.provenance_cache), billing=self.billing)
        await self.gpu_monitor.start()
        self.gpu_monitor.subscribe(self._on_gpu_change)
        await self.supervisor.start()
        if self.uptime is not None:
            self.uptime.start()
        await self.capacity.start()
        await self.context_lengths.start()
        await self.registration.start()
        if self.gateway_processes is not None:
            await self.gateway_processes.start()

    def mount_billing_routes(self, billing: BillingService) -> None:
        """The key holder's and the admin's routes on `billing`'s store; admin actions are audited there."""
        self.admin_access.recorder = audit_recorder(billing.store)
        self.app.include_router(build_key_router(billing.keys, billing.store))
        self.app.include_router(build_admin_router(billing.store, self.admin_access))
        self.app.include_router(build_economics_router(billing.store, self.config, self.admin_access,
                                                       before_report=self._refresh_uptime))

    async def _refresh_uptime(self) -> None:
        if self.uptime is not None:
            await self.uptime.refresh()

    async def stop(self) -> None:
        logger.info("worker stopping", extra={"worker_id": self.config.worker.id})
        if self.gateway_processes is not None:
            await self.gateway_processes.stop()
        await self.registration.stop()
        await self.context_lengths.stop()
        await self.capacity.stop()
        await self.supervisor.stop()
        if self.uptime is not None:
            await self.uptime.stop()
        await self.gpu_monitor.stop()
        await self.gateway.aclose()
        if self.billing is not None:
            await self.billing.close()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        ok, detail = self.capacity.readiness()
        if self.billing is not None and self.billing.claim.lost:
            return False, {**detail, "worker_id_taken_over": True}
        return ok, detail

    def provenance(self, replica: Replica | None) -> Provenance:
        """Where a request ran, for response headers and the ledger (read through `provenance_cache`)."""
        worker_id = self.config.worker.id
        if replica is None:
            return Provenance(worker_id=worker_id, engine_version=f"worker {__version__}")
        snapshot = self.gpu_monitor.snapshot()
        gpus = [g for g in (snapshot.gpu(i) for i in replica.spec.gpu_ids) if g is not None]
        return Provenance(worker_id=worker_id, replica_id=replica.replica_id,
                          gpu_model=gpus[0].name if gpus else None, gpu_uuids=tuple(g.uuid for g in gpus),
                          model_revision=replica.spec.model.revision, engine_version=replica.engine.version)

    async def _worker_id_taken_over(self) -> None:
        # Another worker serves under this id now: drain for good, so readiness, /capacity, the registry
        # and admission all say so (requests already running finish).
        self.capacity.drain.begin(shutting_down=True)
        await self.registration.draining()

    async def _on_gpu_change(self, change: GpuHealthChange) -> None:
        self.provenance_cache.invalidate()
        if change.current is GpuHealth.FAILED:
            await self.supervisor.quarantine_gpu(change.index, reason=f"GPU {change.index} failed")

    async def metrics(self) -> Response:
        # Engines' pages are fetched now rather than with every admission scrape (5 per second).
        await self.capacity.fetch_engine_pages()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def node_metrics(self) -> Response:
        """The node as one model server, for an inference gateway's endpoint picker (see node_view)."""
        queued = {model_id: queue.depth for model_id, queue in self.capacity.admission.queues.items()}
        page = render_node_page(readings_from_watches(self.capacity.watches), queued)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    async def drain(self, hurry: asyncio.Event | None = None) -> None:
        """Before shutdown: refuse new requests, let in-flight ones finish (worker.drain_grace_s), end the rest."""
        await self.registration.draining()
        await self.capacity.drain_for_shutdown(self.config.worker.drain_grace_s, hurry)
