"""What the gateway knows about one inference request, from arrival to the last byte."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import uuid_utils
from starlette.datastructures import Headers
from starlette.types import Receive, Scope

if TYPE_CHECKING:
    from worker.config import ModelConfig
    from worker.engines.data_client import EngineDataClient


# Where a token count came from. Measured: the engine's own usage, or the model's tokenizer (through the
# engine's /tokenize) counting the prompt the worker sent. Estimated: one token per streamed event, or the
# prompt's size at four bytes per token (OpenAI's rule of thumb) when no tokenizer answered.
UsageSource = Literal["engine", "tokenizer", "stream", "estimate", "none"]
ESTIMATED_SOURCES: frozenset[str] = frozenset({"stream", "estimate"})


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_source: UsageSource = "engine"
    completion_source: UsageSource = "engine"

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        details = usage.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )

    @property
    def estimated(self) -> bool:
        return self.prompt_source in ESTIMATED_SOURCES or self.completion_source in ESTIMATED_SOURCES


# Where `RequestContext.gpu_seconds` came from: the engine's own figure (the mock reports `usage.gpu_seconds`),
# the worker's estimate from each replica's requests in flight (worker/capacity/gpu_time.py), or "none": the
# request never held a replica (0.0).
GpuSecondsSource = Literal["engine", "estimate", "none"]


class GpuTimer(Protocol):
    """A request's share of its replica's busy time, metered from its lease on (in the worker process;
    a relay process's stand-in passes the first byte on to it)."""

    def first_byte(self, at: float) -> None: ...

    def settle(self, at: float) -> float | None:
        """The request is over: its replica-seconds (None: metered in another process). Idempotent."""
        ...


class EngineTarget(Protocol):
    """A replica as the request path sees it: which one it is, and the client that reaches its engine
    (the node's `engines.replica.Replica`, or a relay process's stand-in for it)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def model_id(self) -> str: ...

    @property
    def data(self) -> EngineDataClient: ...


@dataclass(frozen=True, slots=True)
class RequestView:
    """What hooks may read of the HTTP request itself: its path and headers (a mapping, names
    case-insensitive), and `receive`, to notice the client leave while a hook waits (None: not watched)."""

    path: str
    headers: Headers
    receive: Receive | None = None

    @classmethod
    def of(cls, scope: Scope, receive: Receive | None = None) -> RequestView:
        return cls(path=scope["path"], headers=Headers(scope=scope), receive=receive)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is billed to, and what it holds until it is settled (set by billing's hook)."""

    account_id: str
    key_id: str
    byok: bool
    tokens_per_minute: int | None
    reserved_micro: int
    # The tokens the rate limiter debited up front, corrected to the real count when the request ends.
    rate_tokens: int


@dataclass
class RequestContext:
    """Mutable per-request record; hooks read it, the relay fills it in."""

    request_id: str
    endpoint: str  # "chat.completions" | "completions" | "embeddings"
    model: ModelConfig
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    headers: dict[str, str]
    # The worker's own id for this request, unique across every worker: the ledger and the outbox key
    # on it. `request_id` may come from the client (x-request-id) and so may repeat. Time-ordered
    # (UUIDv7), so the ledger's index on it grows at one end rather than everywhere.
    record_id: str = field(default_factory=lambda: f"rec-{uuid_utils.uuid7().hex}")
    received_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    # The relay process that serves it when the worker runs several gateway processes (else None).
    gateway_process: int | None = None
    # Filled by authentication (billing); None when auth is off.
    principal: Principal | None = None
    # Whose share of a queued model this request uses (billing sets the account), and its priority.
    flow: str | None = None
    priority: int = 0
    # The client's session (its session header, else the OpenAI `user` field): turns go where the last went.
    session_key: str | None = None
    # The size of the request's body as received: what it costs to keep it queued.
    body_bytes: int = 0
    replica: EngineTarget | None = None
    status_code: int = 0
    # When a replica was leased (after auth, the balance reservation and admission) and the engine's first
    # byte came.
    admitted_monotonic: float | None = None
    first_byte_monotonic: float | None = None
    finished_monotonic: float | None = None
    usage: Usage | None = None
    # True when `usage` was estimated from streamed chunks because the engine never sent its count.
    usage_estimated: bool = False
    streamed_events: int = 0
    finish_reason: str | None = None
    # "ok", "engine_error", "client_disconnected", "upstream_failed", "rejected"
    outcome: str = "ok"
    error_message: str | None = None
    # Extra response headers hooks want to add (rate-limit headers, provenance, ...).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Extra fields merged into the final `usage` object sent to the client (e.g. cost).
    usage_extras: dict[str, Any] = field(default_factory=dict)
    # Its share of its replica's busy GPU time, in GPU-seconds (replica-seconds x the model's
    # gpus_per_replica); set when its finalize starts, before any hook's finalize (pipeline.HookChain).
    gpu_seconds: float | None = None
    gpu_seconds_source: GpuSecondsSource | None = None
    gpu_timer: GpuTimer | None = None

    @property
    def max_tokens(self) -> int | None:
        value = self.body.get("max_completion_tokens", self.body.get("max_tokens"))
        return int(value) if isinstance(value, int) else None
