"""One watcher per replica: scrape the engine's load, prove it makes progress, restart it when hung.

vLLM's /health answers 200 while an engine is hung, so progress is proven from the engine's token
counters instead: a replica with work whose counters stand still for `hang_after_s` is hung. An idle
replica is probed now and then with a one-token request, sent only when the engine reports nothing
running or waiting, so the probe never queues behind real work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from worker.capacity.limits import AdmissionLimits
from worker.capacity.load import EngineLoad
from worker.capacity.stats import ADMISSION_SAMPLES, EngineStats
from worker.config.models import EngineHealthConfig
from worker.engines.replica import Replica, ReplicaState

logger = logging.getLogger(__name__)

HangHandler = Callable[[Replica, str], Awaitable[None]]

# vLLM mounts prometheus_client's exporter at /metrics/, which answers only the samples named in
# `name[]`: ~1.7 KB instead of the whole ~52 KB page, a quarter of the engine's CPU per scrape. (Its
# /metrics without the slash always renders everything.)
FILTERED_METRICS_PATH = "/metrics/"
# The engine's info metrics ride along (a few hundred bytes) for the node-level view, /metrics/node.
ENGINE_INFO_SAMPLES = ("vllm:cache_config_info", "vllm:lora_requests_info")
FILTERED_METRICS_PARAMS = {"name[]": [*ADMISSION_SAMPLES, *ENGINE_INFO_SAMPLES]}


class ReplicaWatch:
    def __init__(self, replica: Replica, health: EngineHealthConfig, limits: AdmissionLimits,
                 on_hung: HangHandler, clock: Callable[[], float] = time.monotonic) -> None:
        self.replica = replica
        self.health = health
        self.limits = limits
        self.on_hung = on_hung
        self.clock = clock
        # External URLs are not ours to scrape or restart; only the gateway's in-flight cap applies.
        self.has_metrics = replica.engine.kind != "external"
        self.load = EngineLoad(clock())
        self.hang_restarts = 0
        self._watching = False
        self._last_probe_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        # False once this engine's exporter answered a filtered scrape with something else than the
        # samples asked for: from then on it is scraped whole.
        self._filtered_scrapes = True
        # Called after each scrape: the engine's queue or KV use may have room again.
        self.on_update: Callable[[], None] | None = None
        # Called when a new engine instance is watched: whatever the old one cached is gone.
        self.on_new_instance: Callable[[], None] | None = None

    # -- what admission and /capacity read ------------------------------------------------------

    @property
    def metered_load(self) -> EngineLoad | None:
        return self.load if self.has_metrics else None

    @property
    def routable(self) -> bool:
        """Up, and (for engines with metrics) its load known at least once since it started."""
        return self.replica.routable and (not self.has_metrics or self.load.stats is not None)

    def load_headers(self) -> dict[str, str]:
        headers = {"x-worker-in-flight": str(self.replica.in_flight)}
        stats = self.load.stats if self.has_metrics else None
        if stats is not None:
            headers["x-worker-queue-depth"] = str(stats.waiting)
            headers["x-worker-running"] = str(stats.running)
            headers["x-worker-kv-cache-usage"] = f"{stats.kv_cache_usage:.3f}"
        return headers

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"watch-{self.replica.replica_id}")

    async def stop(self) -> None:
        tasks = [task for task in (self._task, self._probe_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._probe_task = None

    async def _run(self) -> None:
        interval = self.health.stats_interval_s
        while True:
            started = self.clock()
            try:
                await self.check_once()
            except Exception:  # the watcher must outlive any one bad scrape or restart
                logger.exception("replica watch failed", extra={"replica": self.replica.replica_id})
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    async def check_once(self) -> None:
        """One round: scrape, look for a hang, maybe probe. Does nothing while the replica is not up."""
        now = self.clock()
        if self.replica.state is not ReplicaState.ready:
            if self._watching:
                self._watching = False
                self.load.reset(now)
            return
        if not self._watching:  # a new engine instance: start from a clean slate
            self._watching = True
            self.load.reset(now)
            self._last_probe_at = now
            if self.on_new_instance is not None:
                self.on_new_instance()
        if not self.has_metrics:
            return
        await self._scrape()
        now = self.clock()
        reason = self.load.hang_reason(now, self.health.hang_after_s)
        if reason is not None:
            await self._hung(reason)
        elif self._probe_due(now):
            self._last_probe_at = now
            self._probe_task = asyncio.create_task(self._probe(), name=f"probe-{self.replica.replica_id}")

    async def _scrape(self) -> None:
        timeout = min(self.health.hang_after_s, max(1.0, self.health.stale_after_s))
        try:
            stats, page = await self._scrape_stats(timeout)
        except (httpx.HTTPError, ValueError) as error:
            logger.debug("engine scrape failed", extra={"replica": self.replica.replica_id, "error": repr(error)})
            return
        self.load.record(stats)
        self.load.scraped_page = page
        if self.on_update is not None:
            self.on_update()

    async def _scrape_stats(self, timeout: float) -> tuple[EngineStats, str]:
        if self._filtered_scrapes:
            response = await self.replica.client.get(FILTERED_METRICS_PATH, params=FILTERED_METRICS_PARAMS,
                                                     timeout=timeout)
            try:
                response.raise_for_status()
                return EngineStats.from_vllm_scrape(response.text, self.clock()), response.text
            except (httpx.HTTPStatusError, ValueError):
                pass  # an exporter without the filter: try the whole page, which decides
        response = await self.replica.client.get("/metrics", timeout=timeout)
        response.raise_for_status()
        stats = EngineStats.from_vllm_scrape(response.text, self.clock())
        if self._filtered_scrapes:
            self._filtered_scrapes = False
            logger.info("engine metrics cannot be filtered; scraping the whole page",
                        extra={"replica": self.replica.replica_id})
        return stats, response.text

    async def fetch_engine_page(self, timeout: float) -> None:
        """Fetch the engine's whole /metrics page for re-export (read when the worker's /metrics is)."""
        if not self.has_metrics or self.replica.state is not ReplicaState.ready:
            return
        try:
            response = await self.replica.client.get("/metrics", timeout=timeout)
            response.raise_for_status()
        except httpx.HTTPError as error:
            logger.debug("engine metrics page not fetched", extra={"replica": self.replica.replica_id,
                                                                  "error": repr(error)})
            return
        self.load.engine_page = response.text

    async def _hung(self, reason: str) -> None:
        if not self._watching or self.replica.state is not ReplicaState.ready:
            return  # already handled, or the supervisor took it down meanwhile
        self._watching = False
        self.load.reset(self.clock())
        self.hang_restarts += 1
        logger.error("engine replica hung; restarting it", extra={"replica": self.replica.replica_id,
                                                                 "reason": reason})
        await self.on_hung(self.replica, f"hung: {reason}")

    # -- idle probe -----------------------------------------------------------------------------

    def _probe_due(self, now: float) -> bool:
        interval = self.health.probe_interval_s
        return (interval is not None and (self._probe_task is None or self._probe_task.done())
                and now - self._last_probe_at >= interval
                and self.load.is_idle() and self.replica.in_flight == 0)

    def _probe_request(self) -> tuple[str, dict[str, object]]:
        model = self.replica.spec.model
        if model.task == "embed":
            return "/v1/embeddings", {"model": model.id, "input": "ping"}
        return "/v1/completions", {"model": model.id, "prompt": "ping", "max_tokens": 1, "temperature": 0}

    async def _probe(self) -> None:
        stats_before = self.load.stats
        path, body = self._probe_request()
        timeout = self.health.probe_timeout_s
        try:
            response = await self.replica.client.post(path, json=body, timeout=timeout)
        except httpx.TransportError as error:
            failure = f"a one-token probe got no answer in {timeout:g}s ({type(error).__name__})"
        else:
            if response.status_code != 200:  # an answer, so not hung; the engine's errors reach clients anyway
                logger.warning("engine probe answered with an error", extra={
                    "replica": self.replica.replica_id, "status": response.status_code})
            return
        stats_after = self.load.stats
        moved = (stats_before is not None and stats_after is not None
                 and stats_after.tokens_total > stats_before.tokens_total)
        if not moved:  # work that did move means the probe only waited its turn
            await self._hung(failure)
