"""Wire shape of `GET /capacity`: what each model and replica can take right now, and why."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class CapacityState(StrEnum):
    starting = "starting"  # launching, or up but its load not read yet
    ready = "ready"  # takes requests
    saturated = "saturated"  # up, but full: new requests get 429 until it drains
    draining = "draining"  # the worker takes no new requests
    unhealthy = "unhealthy"  # crashed, hung, restarting, or its GPU failed


class GpuView(BaseModel):
    index: int
    uuid: str | None = None
    health: str  # healthy | degraded | failed | unknown (no NVML reading)
    reasons: list[str] = []
    xid_last: int | None = None


class ReplicaCapacity(BaseModel):
    replica: str
    state: CapacityState
    engine: str
    in_flight: int
    max_in_flight: int
    max_num_seqs: int
    running: int | None
    waiting: int | None
    kv_cache_usage: float | None
    output_tokens_per_s: float | None
    requests_finished_per_s: float | None
    estimated_queue_wait_s: float | None
    stats_age_s: float | None  # how old the engine numbers above are
    restarts: int
    hang_restarts: int
    gpus: list[GpuView]


class ModelCapacity(BaseModel):
    id: str
    state: str  # ready | saturated | starting | draining | unavailable
    admission_enabled: bool
    max_model_len: int
    replicas: list[ReplicaCapacity]


class CapacityDocument(BaseModel):
    worker_id: str
    ready: bool
    draining: bool
    taken_at: float  # unix time
    gpu_monitoring: str  # NVML state: available | nvml_unavailable | not_started
    models: list[ModelCapacity]
