"""Per-replica admission limits: when a replica counts as full, its load score, and when it should have room
again. The watchdog keeps one per replica; admission reads them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.config.models import ModelConfig

if TYPE_CHECKING:
    from worker.capacity.load import EngineLoad

MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Per-replica limits of one model (models.yaml `admission:`, defaults from `max_num_seqs`)."""

    enabled: bool
    max_num_seqs: int
    max_in_flight: int
    max_waiting: int
    max_kv_cache_usage: float
    stale_after_s: float
    late_admit_s: float = 0.0

    @classmethod
    def for_model(cls, model: ModelConfig, stale_after_s: float, late_admit_s: float = 0.0) -> AdmissionLimits:
        config = model.admission
        seqs = model.max_num_seqs
        allowance = config.queue_allowance if config.queue_allowance is not None else seqs // 32
        return cls(
            enabled=config.enabled,
            max_num_seqs=seqs,
            max_in_flight=config.max_in_flight or seqs + allowance,
            max_waiting=config.max_waiting or max(1, allowance),
            max_kv_cache_usage=config.max_kv_cache_usage,
            stale_after_s=stale_after_s,
            late_admit_s=late_admit_s,
        )

    def saturation(self, in_flight: int, load: EngineLoad | None, now: float) -> str | None:
        """Why the replica should take no more work now, or None when it can batch one more request soon.

        `load` is None for engines without metrics (external URLs): only the in-flight cap applies.
        """
        if in_flight >= self.max_in_flight:
            return "in_flight"
        if load is None:
            return None
        stats = load.stats
        if stats is None:
            return "stale_stats"  # flying blind counts as full
        age = now - stats.scraped_at
        if age > self.stale_after_s and (age > self.late_admit_s or in_flight >= self.max_num_seqs):
            # Late stats still admit a while when the gateway's own count shows a free batch slot: the
            # engine runs nothing the gateway did not send it.
            return "stale_stats"
        if self._queued_beyond_batch(stats.running, stats.waiting) >= self.max_waiting:
            return "engine_queue"
        if stats.kv_cache_usage >= self.max_kv_cache_usage:
            return "kv_cache"
        return None

    def _queued_beyond_batch(self, running: int, waiting: int) -> int:
        # Requests wait briefly between engine steps even with free batch slots; only those that
        # cannot get a slot are a queue.
        return waiting - max(0, self.max_num_seqs - running)

    def score(self, in_flight: int, load: EngineLoad | None) -> float:
        """Lower is less loaded."""
        kv_usage = load.stats.kv_cache_usage if load is not None and load.stats is not None else 0.0
        return in_flight / self.max_in_flight + kv_usage / 2

    def retry_after_s(self, in_flight: int, load: EngineLoad | None) -> int:
        """Whole seconds until the replica should have room again, from its recent drain rate."""
        ahead = in_flight - self.max_in_flight + 1
        if load is None:
            return 1
        if load.stats is not None:
            ahead = max(ahead, self._queued_beyond_batch(load.stats.running, load.stats.waiting) - self.max_waiting + 1)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(load.seconds_until(ahead))))
