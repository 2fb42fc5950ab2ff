"""Typed schema of `models.yaml`. Every field is validated at start-up; errors name the field."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

# vLLM flags the supervisor sets itself; letting engine_args set them would break routing or GPU pinning.
MANAGED_ENGINE_ARGS = frozenset(
    {"host", "port", "model", "served_model_name", "tensor_parallel_size", "revision", "api_key"}
)


# engine_args vLLM reads as JSON objects (the Run:ai streamer's concurrency and memory limit are set in
# model_loader_extra_config); every other one is a scalar.
JSON_ENGINE_ARGS = frozenset({"hf_overrides", "override_generation_config", "model_loader_extra_config"})
# `s3://bucket/prefix`: S3 bucket naming rules, then the key prefix the checkpoint's files sit under.
OBJECT_STORAGE_SOURCE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+$")
# The load formats vLLM accepts for weights in object storage (the Run:ai Model Streamer).
OBJECT_STORAGE_LOAD_FORMATS = frozenset({"runai_streamer", "runai_streamer_sharded"})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineKind(str, Enum):
    vllm = "vllm"
    mock = "mock"
    external = "external"


class DatacenterConfig(StrictModel):
    country_code: str = Field(pattern=r"^[A-Z]{2}$")
    region: str | None = None


class EngineHealthConfig(StrictModel):
    """How the worker watches each engine replica's load and proves it still makes progress."""

    # The engine's /metrics is polled this often; admission decides on these numbers.
    stats_interval_s: float = Field(default=0.2, gt=0, le=10)
    # Older stats count as saturated (default: three polls) ...
    stats_stale_after_s: float | None = Field(default=None, gt=0)
    # ... except for this long (from the last answered scrape) while the gateway has fewer requests open
    # on the replica than max_num_seqs: an engine's HTTP server busy with a burst of new requests answers
    # scrapes late, and the gateway, the engine's only client, knows a batch slot is free. 0: never.
    stats_late_admit_s: float = Field(default=5.0, ge=0)
    # A replica with work whose token counters stand still this long is hung and gets restarted.
    hang_after_s: float = Field(default=30.0, gt=0)
    # An idle replica is probed with a one-token request this often (null: never) ...
    probe_interval_s: float | None = Field(default=30.0, gt=0)
    # ... and is hung when the probe gets no answer in this time.
    probe_timeout_s: float = Field(default=20.0, gt=0)

    @property
    def stale_after_s(self) -> float:
        return self.stats_stale_after_s if self.stats_stale_after_s is not None else 3 * self.stats_interval_s


class HttpLimitsConfig(StrictModel):
    """Limits of the HTTP server on the worker's port, so that no client can hold the worker's memory
    (the node's control plane: an OOM-killed worker takes every engine with it) or its connections.

    They apply in every process that accepts the port (each relay process when gateway_processes > 1).
    """

    # A request line and headers larger than this get 431 and the connection is closed; what is read of
    # them is never more than this.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # The request line and headers must arrive within this many seconds of the connection being opened
    # (or of their first byte on a kept-alive connection); else 408 (or a silent close when nothing came).
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # The whole body must arrive within this many seconds of the headers; else 408. A trickled body is
    # cut here, before the request reaches the gateway (4 MiB in 30 s is 140 KB/s).
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Open connections per process; above it a request gets 429 with Retry-After (health and metrics
    # paths excepted) and its connection is closed.
    max_connections: int = Field(default=4096, ge=16, le=1_000_000)
    # An idle kept-alive connection is closed after this many seconds: longer than the idle timeout of
    # the client pools in front (routers, load balancers: 60 s on AWS ALB), so the client, not the
    # worker, closes it and never sends a request on a connection the worker is closing.
    keep_alive_timeout_s: int = Field(default=75, ge=1, le=3600)


def decimal_from_yaml(value: Any) -> Any:
    """YAML turns 0.1 into a float; go through its repr so 0.1 stays exactly 0.1."""
    return Decimal(repr(value)) if isinstance(value, float) else value


class WorkerSection(StrictModel):
    # Also names the worker's ledger journal directory: starts with a letter or digit, so never '.' or '..'.
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: HttpUrl | None = None
    datacenters: list[DatacenterConfig] = Field(default_factory=list)
    # Engines listen on loopback only; the gateway is the single door to them.
    engine_host: str = "127.0.0.1"
    engine_port_start: int | None = Field(default=None, ge=1024, le=65000)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    engine_start_timeout_s: float = Field(default=900.0, gt=0)
    restart_backoff_initial_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    engine_stop_timeout_s: float = Field(default=15.0, gt=0)
    engine_health: EngineHealthConfig = Field(default_factory=EngineHealthConfig)
    # On SIGTERM, in-flight requests get this long to finish before they are ended.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # A stream whose first token is slower than this gets SSE comment keep-alives meanwhile.
    sse_keepalive_interval_s: float = Field(default=5.0, gt=0)
    # Processes that accept the port and relay inference bytes. 1: the worker process does it all. More
    # when one core cannot relay every replica's tokens (roughly 50k tokens/s each); the worker process
    # then only decides (auth, admission, billing, metrics) and serves the rest of the API behind them.
    gateway_processes: int = Field(default=1, ge=1, le=64)
    http: HttpLimitsConfig = Field(default_factory=HttpLimitsConfig)
    # What one GPU-hour of this node costs, in USD (a decimal string, e.g. "2.49"): the economics' GPU cost.
    gpu_hour_usd: Decimal = Field(default=Decimal(0), ge=0, allow_inf_nan=False)

    _exact_gpu_hour_usd = field_validator("gpu_hour_usd", mode="before")(decimal_from_yaml)


class Pricing(StrictModel):
    """Prices in USD per million tokens (and per request). Decimal, never float."""

    prompt_per_mtok: Decimal = Field(ge=0)
    completion_per_mtok: Decimal = Field(ge=0)
    request: Decimal = Field(default=Decimal(0), ge=0)
    cached_prompt_per_mtok: Decimal | None = Field(default=None, ge=0)

    @field_validator("prompt_per_mtok", "completion_per_mtok", "request", "cached_prompt_per_mtok", mode="before")
    @classmethod
    def _no_binary_floats(cls, value: Any) -> Any:
        # YAML turns 0.1 into a float; go through str so 0.1 stays exactly 0.1.
        if isinstance(value, float):
            return Decimal(repr(value))
        return value


class MockEngineConfig(StrictModel):
    """Latency model of the CPU mock engine (ignored by real engines)."""

    seed: int = 0
    step_base_ms: float = Field(default=8.0, ge=0)
    step_per_seq_ms: float = Field(default=0.15, ge=0)
    prefill_per_token_ms: float = Field(default=0.01, ge=0)
    num_kv_blocks: int = Field(default=8192, ge=1)
    block_size: int = Field(default=16, ge=1)
    embedding_dim: int = Field(default=64, ge=1)
    # Prefix caching as vLLM's v1 engine does it (on by default there too): full blocks stay cached after
    # their request and later prompts that start with them skip that prefill.
    enable_prefix_caching: bool = True
    # vLLM's --enable-prompt-tokens-details: usage carries prompt_tokens_details (cached tokens).
    enable_prompt_tokens_details: bool = False
    # KV-cache events as vLLM's --kv-events-config publishes them: a ZMQ PUB socket on this port of the
    # engine's host, and optionally the replay (ROUTER) socket (`worker mock-engine --kv-events-port` sets
    # one per replica).
    kv_events_port: int | None = Field(default=None, ge=1, le=65535)
    kv_events_replay_port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _replay_needs_events(self) -> MockEngineConfig:
        if self.kv_events_replay_port is not None and self.kv_events_port is None:
            raise ValueError("kv_events_replay_port needs kv_events_port")
        if self.kv_events_port is not None and self.kv_events_port == self.kv_events_replay_port:
            raise ValueError("kv_events_replay_port must differ from kv_events_port")
        return self


class AdmissionConfig(StrictModel):
    """When a replica takes one more request; over these limits the gateway answers 429 at once.

    Unset limits derive from the model's `max_num_seqs`, so a request is only admitted while the
    engine can put it into a batch soon.
    """

    enabled: bool = True
    # Requests the gateway keeps open on one replica (default: max_num_seqs + queue_allowance).
    max_in_flight: int | None = Field(default=None, ge=1)
    # How many requests may wait for a batch slot (default: max_num_seqs // 32, so 8 for 256 and none
    # below 32): each waiting request adds about one request duration / max_num_seqs to TTFT.
    queue_allowance: int | None = Field(default=None, ge=0)
    # The engine's own waiting queue must be shorter than this (default: queue_allowance, at least 1).
    max_waiting: int | None = Field(default=None, ge=1)
    max_kv_cache_usage: float = Field(default=0.95, gt=0, le=1)
    # The first-token objective: a request is queued in the worker while its predicted wait for a batch
    # slot is within this, refused with 429 when it is not, and refused the same way if it is still
    # queued this long after it arrived. Keep it below the router's first-byte timeout: nothing is sent
    # to a queued request, so that a refusal is still a clean 429.
    ttft_objective_s: float = Field(default=10.0, gt=0)
    # Memory bounds of the worker's queue for this model (requests, and their bodies' bytes).
    max_queued: int = Field(default=1024, ge=0)
    max_queued_bytes: int = Field(default=256 * 1024 * 1024, ge=0)


class RoutingConfig(StrictModel):
    """Which replica with room takes a queued request when it is bound (late binding)."""

    # cache_aware: the replica holding the longest prefix of the prompt (by the approximate index of the
    # prefixes the worker sent where), unless its load exceeds the least-loaded one's by `load_margin`;
    # least_loaded; round_robin (for comparison). The exact index from the engines' KV-cache events
    # (worker/capacity/kv_index.py) costs 3.5-15 ms of tokenizing per request against ~0.15 ms for the
    # approximate one (bench/prefix_index_cpu.py), more than the gateway spends on a whole request, so
    # placement does not use it.
    policy: Literal["cache_aware", "least_loaded", "round_robin"] = "cache_aware"
    # Load scores are in_flight / max_in_flight (+ KV use / 2): 0.25 is a quarter of a replica's slots.
    load_margin: float = Field(default=0.25, ge=0)
    # A client's own session key: turns with the same value go to the replica that served the last one.
    session_header: str = "x-session-id"


# What OpenRouter's listing format allows in each list (names as the router spells them).
SamplingParameter = Literal[
    "temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "stop", "seed", "max_tokens", "logit_bias", "logprobs", "top_logprobs",
]
ListingFeature = Literal["tools", "json_mode", "structured_outputs", "logprobs", "web_search", "reasoning"]
InputModality = Literal["text", "image", "file", "audio", "video"]
OutputModality = Literal["text", "image", "audio", "embeddings"]


def _text_only() -> list[InputModality]:
    return ["text"]


class ComplianceConfig(StrictModel):
    """Data-handling claims a router shows users; state only what the deployment guarantees."""

    zdr: bool | None = None  # zero data retention: prompts neither kept nor trained on
    hipaa: bool | None = None


class ModelListingConfig(StrictModel):
    """How the model is described to routers (`GET /v1/models`, `/openrouter/models`, the registry).

    Every field is optional; unset ones are derived from the rest of the model's configuration.
    """

    # Display name (default: "Author: Model Name" from the id, as OpenRouter names models).
    name: str | None = Field(default=None, min_length=1)
    description: str | None = None
    # Tokenizer family ("Llama3", "Qwen", ...; current format only). Unset: left out.
    tokenizer: str | None = Field(default=None, min_length=1)
    input_modalities: list[InputModality] = Field(default_factory=_text_only, min_length=1)
    # Default: ["text"], or ["embeddings"] for task embed.
    output_modalities: list[OutputModality] | None = Field(default=None, min_length=1)
    # Longest completion a request may ask for (default: the context length).
    max_output_length: int | None = Field(default=None, ge=1)
    # Default: every sampling parameter vLLM accepts (none for embedding models).
    supported_sampling_parameters: list[SamplingParameter] | None = None
    # Default: json_mode, structured_outputs and logprobs; tools when engine_args enable automatic tool
    # choice with a tool_call_parser; reasoning when engine_args set a reasoning_parser.
    supported_features: list[ListingFeature] | None = None
    deprecation_date: date | None = None
    openrouter_slug: str | None = Field(default=None, min_length=1)
    # A free endpoint (OpenRouter lists it with the `:free` suffix and ignores its prices).
    is_free: bool | None = None
    # Fraction taken off the prices OpenRouter shows users (negative: a markup); 1 or more is invalid.
    discount_to_user: float | None = Field(default=None, lt=1)
    # Prompt tokens per minute the model's replicas can take (legacy `capacity_tpm`; a per-minute
    # prompt capacity on the text input in the current format). Unset: undeclared.
    capacity_tpm: int | None = Field(default=None, ge=1)
    # Current format only: the deployment's region label, and its data-handling claims.
    deployment_region: str | None = Field(default=None, min_length=1)
    compliance: ComplianceConfig | None = None


class ModelConfig(StrictModel):
    id: str = Field(min_length=1, max_length=256)
    engine: EngineKind = EngineKind.vllm
    source: str = Field(min_length=1)
    revision: str | None = None
    replicas: int = Field(default=1, ge=1, le=64)
    gpus_per_replica: int = Field(default=1, ge=1, le=64)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    engine_env: dict[str, str] = Field(default_factory=dict)
    pricing: Pricing
    task: str = Field(default="generate", pattern=r"^(generate|embed)$")
    quantization: str | None = None
    hugging_face_id: str | None = None
    mock: MockEngineConfig = Field(default_factory=MockEngineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    listing: ModelListingConfig = Field(default_factory=ModelListingConfig)
    # This model's GPU-hour cost in USD where it differs from `worker.gpu_hour_usd` (e.g. other GPUs).
    gpu_hour_usd: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)

    _exact_gpu_hour_usd = field_validator("gpu_hour_usd", mode="before")(decimal_from_yaml)

    @field_validator("engine_args")
    @classmethod
    def _engine_args_not_managed(cls, args: dict[str, Any]) -> dict[str, Any]:
        normalised: dict[str, Any] = {}
        for key, value in args.items():
            name = key.replace("-", "_")
            if name in MANAGED_ENGINE_ARGS:
                raise ValueError(f"'{key}' is set by the worker itself and cannot appear in engine_args")
            if isinstance(value, (dict, list)) and name not in JSON_ENGINE_ARGS:
                raise ValueError(f"'{key}' must be a scalar (string, number or boolean)")
            normalised[name] = value
        return normalised

    @model_validator(mode="after")
    def _source_matches_engine(self) -> ModelConfig:
        if self.engine is EngineKind.external:
            HttpUrl(self.source)  # raises a ValueError naming the bad URL
        elif self.engine is EngineKind.vllm and "://" in self.source:
            self._check_object_storage_source()
        return self

    def _check_object_storage_source(self) -> None:
        if not OBJECT_STORAGE_SOURCE.match(self.source):
            raise ValueError(f"source '{self.source}': weights in object storage are given as "
                             "s3://bucket/prefix (other URLs are only for engine: external)")
        if self.revision is not None:
            raise ValueError("revision applies to Hugging Face sources only, not to s3:// sources")
        load_format = self.engine_args.get("load_format")
        if load_format is not None and load_format not in OBJECT_STORAGE_LOAD_FORMATS:
            raise ValueError(f"engine_args.load_format '{load_format}' cannot read s3:// sources; use one of "
                             f"{sorted(OBJECT_STORAGE_LOAD_FORMATS)} or leave it out")

    @property
    def weights_in_object_storage(self) -> bool:
        """True when vLLM streams the weights from an `s3://` source (the Run:ai Model Streamer)."""
        return self.engine is EngineKind.vllm and self.source.startswith("s3://")

    @property
    def max_model_len(self) -> int:
        return int(self.engine_args.get("max_model_len", 4096))

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine_args.get("max_num_seqs", 256))

    @property
    def max_num_batched_tokens(self) -> int:
        return int(self.engine_args.get("max_num_batched_tokens", 2048))

    @property
    def gpus_needed(self) -> int:
        return self.replicas * self.gpus_per_replica if self.engine is EngineKind.vllm else 0


class NodeConfig(StrictModel):
    worker: WorkerSection
    models: list[ModelConfig] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.id in seen:
                raise ValueError(f"model id '{model.id}' appears more than once")
            seen.add(model.id)
        return models

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    @property
    def gpus_needed(self) -> int:
        return sum(m.gpus_needed for m in self.models)
