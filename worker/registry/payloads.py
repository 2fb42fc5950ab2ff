"""Wire shapes of the registry protocol: announcement, heartbeat, drain notice (see docs/router-integration.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from worker.gpu import GpuFleetSnapshot

WorkerStatus = Literal["serving", "draining"]


class GpuEntry(BaseModel):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None
    health: str


class GpuInventorySummary(BaseModel):
    nvml_state: str  # available | nvml_unavailable | not_started
    driver_version: str | None = None
    count: int
    devices: list[GpuEntry] = Field(default_factory=list)


class ModelCapacitySummary(BaseModel):
    id: str
    state: str  # ready | saturated | starting | loading | draining | unavailable
    replicas: int
    ready_replicas: int  # replicas taking requests (saturated ones included)
    max_model_len: int | None = None
    # While replicas load: the least progress among them (0-1), when their engines report it.
    loading_fraction: float | None = None


class CapacitySummary(BaseModel):
    ready: bool
    draining: bool
    models: list[ModelCapacitySummary] = Field(default_factory=list)


class Endpoints(BaseModel):
    """Paths on `public_url` a registry or router may call."""

    chat_completions: str = "/v1/chat/completions"
    completions: str = "/v1/completions"
    embeddings: str = "/v1/embeddings"
    models: str = "/v1/models"
    openrouter_models: str = "/openrouter/models"
    capacity: str = "/capacity"
    ready: str = "/health/ready"
    metrics: str = "/metrics"


class Announcement(BaseModel):
    """`POST {registry}/workers`: the worker introduces itself; sent again whenever the registry forgets it."""

    worker_id: str
    public_url: str | None
    version: str
    started_at: int  # unix time
    heartbeat_interval_s: float
    datacenters: list[dict[str, str]] = Field(default_factory=list)
    endpoints: Endpoints = Field(default_factory=Endpoints)
    # Entries of `GET /v1/models`: OpenAI fields plus OpenRouter's legacy fields, prices per token.
    models: list[dict[str, Any]]
    gpus: GpuInventorySummary
    capacity: CapacitySummary | None = None


class Heartbeat(BaseModel):
    """`POST {registry}/workers/{id}/heartbeat`, every `heartbeat_interval_s`."""

    worker_id: str
    sequence: int  # 1, 2, 3, ... since the worker started; a gap means heartbeats were lost
    sent_at: float
    status: WorkerStatus
    capacity: dict[str, Any] | None  # the `GET /capacity` document


class DrainNotice(BaseModel):
    """`POST {registry}/workers/{id}/draining`: stop sending new requests; in-flight ones are finishing."""

    worker_id: str
    sent_at: float
    status: Literal["draining"] = "draining"


def summarise_gpus(snapshot: GpuFleetSnapshot | None) -> GpuInventorySummary:
    if snapshot is None:
        return GpuInventorySummary(nvml_state="not_started", count=0)
    devices = [GpuEntry(index=gpu.index, uuid=gpu.uuid, name=gpu.name, health=gpu.health.value,
                        memory_total_bytes=gpu.readings.memory_total_bytes) for gpu in snapshot.gpus]
    return GpuInventorySummary(nvml_state=snapshot.nvml_state, driver_version=snapshot.driver_version,
                               count=len(devices), devices=devices)


def summarise_capacity(document: dict[str, Any] | None) -> CapacitySummary | None:
    """The `/capacity` document reduced to what a registry routes on."""
    if not document:
        return None
    models = []
    for model in document.get("models", []):
        replicas = model.get("replicas", [])
        fractions = [r["loading"]["fraction"] for r in replicas
                     if (r.get("loading") or {}).get("fraction") is not None]
        models.append(ModelCapacitySummary(
            id=model["id"], state=str(model.get("state", "unavailable")), replicas=len(replicas),
            ready_replicas=sum(1 for r in replicas if r.get("state") in ("ready", "saturated")),
            max_model_len=model.get("max_model_len"), loading_fraction=min(fractions) if fractions else None))
    return CapacitySummary(ready=bool(document.get("ready")), draining=bool(document.get("draining")),
                           models=models)
