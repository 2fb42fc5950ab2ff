"""Wire shape of `GET /capacity`: what each model and replica can take right now, and why."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class CapacityState(StrEnum):
    loading = "loading"  # the engine is launching: downloading or loading its weights, building its cache
    starting = "starting"  # up, but its load not read yet
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


class LoadingView(BaseModel):
    """How far a loading replica has got, as far as its engine says (`phase` None: nothing said yet)."""

    elapsed_s: float  # since the engine was launched
    phase: str | None = None  # downloading | loading_weights
    done: int | None = None
    total: int | None = None
    unit: str | None = None  # bytes | shards | tensors
    fraction: float | None = None  # done / total, 0-1


class PortHolderView(BaseModel):
    """Who listens on a replica's port instead of its engine (pid None: a process this user cannot see)."""

    port: int
    pid: int | None
    name: str | None


class ReplicaCapacity(BaseModel):
    replica: str
    state: CapacityState
    # The supervisor's view behind `state`: starting | ready | restarting | port_in_use | unhealthy | stopped
    lifecycle: str
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
    # Cached share (0-1) of the prompt tokens the engine looked up in its prefix cache: over the last
    # ~5 s, and since the engine started. None: nothing looked up yet, or the engine does not say.
    prefix_cache_hit_rate: float | None = None
    prefix_cache_hit_rate_lifetime: float | None = None
    stats_age_s: float | None  # how old the engine numbers above are
    restarts: int
    hang_restarts: int
    gpus: list[GpuView]
    loading: LoadingView | None = None  # set while the state is loading
    port_holder: PortHolderView | None = None  # set while the lifecycle is port_in_use


class QueueView(BaseModel):
    """The worker's own queue for a model: requests admitted and waiting for a batch slot."""

    depth: int
    oldest_wait_s: float | None  # how long the oldest queued request has waited
    predicted_wait_s: float | None  # for a request arriving now (None: no completion rate measured yet)
    ttft_objective_s: float  # requests predicted to wait longer are refused with 429


class ModelCapacity(BaseModel):
    id: str
    state: str  # ready | saturated | starting | loading | draining | unavailable
    admission_enabled: bool
    max_model_len: int
    queue: QueueView
    routing: str  # the placement policy: cache_aware | least_loaded | round_robin
    replicas: list[ReplicaCapacity]


class CapacityDocument(BaseModel):
    worker_id: str
    ready: bool
    draining: bool
    taken_at: float  # unix time
    gpu_monitoring: str  # NVML state: available | nvml_unavailable | not_started
    models: list[ModelCapacity]
