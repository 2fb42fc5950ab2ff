"""Announce this worker to a registry, keep it informed with heartbeats, say when it drains, deregister on exit.

A registry outage never harms serving: every call runs on the event loop without blocking it, retries
with exponential backoff within a bounded budget, and a final failure is only logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import BaseModel, SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from worker.config import NodeConfig, Settings
from worker.gpu import GpuFleetSnapshot
from worker.registry.payloads import Announcement, DrainNotice, Heartbeat, summarise_capacity, summarise_gpus

logger = logging.getLogger(__name__)

CallKind = Literal["announce", "heartbeat", "draining", "deregister"]
CALL_KINDS: tuple[CallKind, ...] = ("announce", "heartbeat", "draining", "deregister")
_RETRYABLE_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # per call, first try included
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    # Draining and deregistration happen during shutdown: all their tries together get this long.
    shutdown_budget_s: float = 10.0


@dataclass
class CallCounts:
    attempts: int = 0  # HTTP requests sent, retries included
    successes: int = 0
    failures: int = 0  # calls that failed for good (after their retries)
    last_success_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class CallResult:
    ok: bool
    status: int | None  # HTTP status of the last try; None when no answer came


class RegistryRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"registry answered HTTP {status}")
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status in _RETRYABLE_STATUSES or self.status >= 500


def _retryable(error: BaseException) -> bool:
    if isinstance(error, RegistryRefused):
        return error.retryable
    return isinstance(error, httpx.TransportError)


def redacted_url(url: str) -> str:
    """scheme://host[:port]/path: no credentials or query (which may hold a token) reach a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RegistryClient:
    """`start()` announces (and re-announces until it succeeds), then heartbeats every interval;
    `draining()` tells the registry to stop sending work; `stop()` deregisters. With no URL, all are no-ops.
    """

    def __init__(
        self,
        url: str | None,
        *,
        worker_id: str,
        token: SecretStr | None,
        announcement: Callable[[], Announcement],
        capacity: Callable[[], dict[str, Any] | None],
        heartbeat_interval_s: float = 15.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/") if url else None
        self.worker_id = worker_id
        self._token = token
        self._announcement = announcement
        self._capacity = capacity
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._transport = transport
        self.counts: dict[CallKind, CallCounts] = {kind: CallCounts() for kind in CALL_KINDS}
        self.announced = False
        self.is_draining = False
        self._sequence = 0
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_node(
        cls,
        config: NodeConfig,
        settings: Settings,
        *,
        version: str,
        started_at: int,
        listing: Callable[[], dict[str, Any]],
        capacity: Callable[[], dict[str, Any] | None],
        gpus: Callable[[], GpuFleetSnapshot | None],
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> RegistryClient:
        """A client for a worker node: `listing` is `GET /v1/models`, `capacity` the `/capacity` document."""
        public_url = settings.public_url or config.worker.public_url
        datacenters = [dc.model_dump(exclude_none=True) for dc in config.worker.datacenters]

        def announcement() -> Announcement:
            return Announcement(
                worker_id=config.worker.id, public_url=str(public_url) if public_url else None, version=version,
                started_at=started_at, heartbeat_interval_s=settings.registry_heartbeat_s, datacenters=datacenters,
                models=listing()["data"], gpus=summarise_gpus(gpus()), capacity=summarise_capacity(capacity()))

        return cls(str(settings.registry_url) if settings.registry_url else None, worker_id=config.worker.id,
                   token=settings.registry_token, announcement=announcement, capacity=capacity,
                   heartbeat_interval_s=settings.registry_heartbeat_s, timeout_s=settings.registry_timeout_s,
                   retry=retry, transport=transport)

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            logger.info("no registry configured (WORKER_REGISTRY_URL): not announcing this worker")
            return
        if self._task is not None:
            return
        headers = {"content-type": "application/json", "user-agent": "worker-registry-client"}
        if self._token is not None:
            headers["authorization"] = f"Bearer {self._token.get_secret_value()}"
        self._client = httpx.AsyncClient(base_url=self.url or "", headers=headers, timeout=self.timeout_s,
                                         transport=self._transport)
        logger.info("announcing to registry", extra={"registry": redacted_url(self.url or ""),
                                                     "heartbeat_interval_s": self.heartbeat_interval_s})
        self._task = asyncio.create_task(self._run(), name="registry")

    async def draining(self) -> None:
        """Tell the registry this worker takes no new requests; heartbeats say `draining` from now on."""
        if not self.enabled or self.is_draining:
            return
        self.is_draining = True
        if self._client is None:
            return
        notice = DrainNotice(worker_id=self.worker_id, sent_at=time.time())
        await self._call("draining", "POST", f"/workers/{self.worker_id}/draining", notice,
                         budget_s=self.retry.shutdown_budget_s)

    async def stop(self) -> None:
        """Stop heartbeats and deregister (bounded by the retry policy's shutdown budget)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        try:
            await self._call("deregister", "DELETE", f"/workers/{self.worker_id}", None,
                             budget_s=self.retry.shutdown_budget_s, gone_is_success=True)
        finally:
            await self._client.aclose()
            self._client = None
            self.announced = False

    # -- loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self.announced:
                self.announced = await self._announce()
            else:
                result = await self._heartbeat()
                if result.status == 404:
                    # The registry forgot this worker (say it restarted): introduce it again right away.
                    logger.warning("registry does not know this worker; announcing again")
                    self.announced = False
                    continue
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _announce(self) -> bool:
        try:
            announcement = self._announcement()
        except Exception:
            logger.exception("building the registry announcement failed")
            return False
        result = await self._call("announce", "POST", "/workers", announcement,
                                  budget_s=max(self.heartbeat_interval_s, self.retry.shutdown_budget_s))
        if result.ok:
            logger.info("announced to registry", extra={"models": len(announcement.models)})
        return result.ok

    async def _heartbeat(self) -> CallResult:
        self._sequence += 1
        try:
            capacity = self._capacity()
        except Exception:
            logger.exception("reading capacity for the heartbeat failed")
            capacity = None
        draining = self.is_draining or bool(capacity and capacity.get("draining"))
        heartbeat = Heartbeat(worker_id=self.worker_id, sequence=self._sequence, sent_at=time.time(),
                              status="draining" if draining else "serving", capacity=capacity)
        # Retries stop before the next heartbeat is due, which would carry fresher numbers.
        return await self._call("heartbeat", "POST", f"/workers/{self.worker_id}/heartbeat", heartbeat,
                                budget_s=self.heartbeat_interval_s)

    # -- one call, with retries --------------------------------------------------------------------

    async def _call(self, kind: CallKind, method: str, path: str, payload: BaseModel | None, *,
                    budget_s: float, gone_is_success: bool = False) -> CallResult:
        client = self._client
        if client is None:
            return CallResult(ok=False, status=None)
        counts = self.counts[kind]
        body = orjson.dumps(payload.model_dump(mode="json")) if payload is not None else None
        status: int | None = None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts) | stop_after_delay(budget_s),
            # Doubling waits, plus jitter so a fleet of workers does not retry in step.
            wait=wait_exponential(multiplier=self.retry.initial_backoff_s, max=self.retry.max_backoff_s)
            + wait_random(0, self.retry.initial_backoff_s),
            retry=retry_if_exception(_retryable),
            before_sleep=lambda state: self._log_retry(kind, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    counts.attempts += 1
                    response = await client.request(method, path, content=body)
                    status = response.status_code
                    if status >= 400 and not (gone_is_success and status == 404):
                        raise RegistryRefused(status)
        except (httpx.HTTPError, RegistryRefused) as error:
            counts.failures += 1
            counts.last_error = f"{type(error).__name__}: {error}"
            logger.warning("registry call failed", extra={"call": kind, "status": status, "error": counts.last_error,
                                                          "attempts": retrying.statistics.get("attempt_number")})
            return CallResult(ok=False, status=status)
        except Exception as error:  # whatever went wrong, the worker keeps serving
            counts.failures += 1
            counts.last_error = f"{type(error).__name__}: {error}"
            logger.exception("registry call failed unexpectedly", extra={"call": kind})
            return CallResult(ok=False, status=status)
        counts.successes += 1
        counts.last_success_at = time.time()
        logger.debug("registry call succeeded", extra={"call": kind, "status": status})
        return CallResult(ok=True, status=status)

    @staticmethod
    def _log_retry(kind: CallKind, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.info("registry call failed; retrying", extra={
            "call": kind, "attempt": state.attempt_number, "error": f"{type(error).__name__}: {error}",
            "retry_in_s": round(state.upcoming_sleep, 3)})
