"""What the worker knows about one engine replica's load and progress, from its recent scrapes.

Pure bookkeeping: every method takes the current monotonic time, so it is tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from itertools import pairwise

from worker.capacity.stats import EngineStats

RATE_WINDOW_S = 5.0


class EngineLoad:
    def __init__(self, now: float, rate_window_s: float = RATE_WINDOW_S) -> None:
        self.rate_window_s = rate_window_s
        self.reset(now)

    def reset(self, now: float) -> None:
        """Forget everything: the engine (re)started, or stopped being served."""
        self.stats: EngineStats | None = None
        self.engine_page: str | None = None  # the engine's whole /metrics page, last fetched for re-export
        self.scraped_page: str | None = None  # the last admission scrape's text (info metrics for /metrics/node)
        self.since = now  # when the current engine instance started being watched
        self.last_scrape_ok_at: float | None = None
        self.last_progress_at = now
        self.output_tokens_per_s = 0.0
        self.finished_per_s = 0.0
        # Requests/s the engine last finished while busy: how fast a queue drains. None until seen.
        self.drain_rate_per_s: float | None = None
        # Share of the prompt tokens looked up in the prefix cache that were found there, over the rate
        # window. None while no prompt was looked up in the window (or the engine does not export it).
        self.prefix_cache_hit_rate: float | None = None
        self._samples: deque[EngineStats] = deque()

    # -- feeding -------------------------------------------------------------------------------

    def record(self, stats: EngineStats) -> None:
        previous = self.stats
        if previous is not None and stats.tokens_total < previous.tokens_total:
            self._samples.clear()  # counters went back: a new engine process behind the same port
        moved = previous is None or stats.tokens_total > previous.tokens_total
        if moved or (stats.running == 0 and stats.waiting == 0):
            self.last_progress_at = stats.scraped_at
        self.stats = stats
        self.last_scrape_ok_at = stats.scraped_at
        self._samples.append(stats)
        while len(self._samples) > 2 and stats.scraped_at - self._samples[1].scraped_at >= self.rate_window_s:
            self._samples.popleft()
        self._update_rates()

    def _update_rates(self) -> None:
        first, last = self._samples[0], self._samples[-1]
        elapsed = last.scraped_at - first.scraped_at
        if elapsed <= 0:
            return
        self.output_tokens_per_s = (last.generation_tokens_total - first.generation_tokens_total) / elapsed
        self.finished_per_s = (last.requests_finished_total - first.requests_finished_total) / elapsed
        busy_s, busy_finished = self._busy_progress()
        if busy_s > 0 and busy_finished > 0:
            self.drain_rate_per_s = busy_finished / busy_s
        queried = last.prefix_cache_queries_total - first.prefix_cache_queries_total
        hits = last.prefix_cache_hits_total - first.prefix_cache_hits_total
        self.prefix_cache_hit_rate = _ratio(hits, queried)

    def _busy_progress(self) -> tuple[float, float]:
        """Seconds of the window between scrapes that both found the engine with work, and the requests it
        finished in them. Idle stretches are left out: counted, they made the drain rate look several times
        slower than the engine is, and a burst after a quiet spell was refused for a wait it never had."""
        seconds = finished = 0.0
        for before, after in pairwise(self._samples):
            if before.running + before.waiting > 0 and after.running + after.waiting > 0:
                seconds += after.scraped_at - before.scraped_at
                finished += after.requests_finished_total - before.requests_finished_total
        return seconds, finished

    # -- reading -------------------------------------------------------------------------------

    def age(self, now: float) -> float | None:
        return None if self.stats is None else now - self.stats.scraped_at

    def is_fresh(self, now: float, stale_after_s: float) -> bool:
        return self.stats is not None and now - self.stats.scraped_at <= stale_after_s

    def is_idle(self) -> bool:
        return self.stats is not None and self.stats.running == 0 and self.stats.waiting == 0

    def prefix_cache_hit_rate_lifetime(self) -> float | None:
        """Cached share of every prompt token the engine instance looked up since it started."""
        if self.stats is None:
            return None
        return _ratio(self.stats.prefix_cache_hits_total, self.stats.prefix_cache_queries_total)

    def estimated_queue_wait_s(self) -> float | None:
        """Seconds the engine's waiting queue needs to drain at the recent rate (None: no rate seen yet)."""
        if self.stats is None:
            return None
        if self.stats.waiting == 0:
            return 0.0
        if not self.drain_rate_per_s:
            return None
        return self.stats.waiting / self.drain_rate_per_s

    def seconds_until(self, requests_ahead: int) -> float:
        """How long until `requests_ahead` requests have finished, at the recent drain rate (1 s if unknown)."""
        if not self.drain_rate_per_s:
            return 1.0
        return max(requests_ahead, 1) / self.drain_rate_per_s

    def hang_reason(self, now: float, hang_after_s: float) -> str | None:
        """Why this engine counts as hung, or None while it proves progress."""
        if now - self.since < hang_after_s:
            return None
        last_ok = self.last_scrape_ok_at if self.last_scrape_ok_at is not None else self.since
        if now - last_ok >= hang_after_s:
            return f"its /metrics has not answered for {now - last_ok:.1f}s"
        stats = self.stats
        if stats is not None and (stats.running or stats.waiting) and now - self.last_progress_at >= hang_after_s:
            return (f"no token progress for {now - self.last_progress_at:.1f}s with {stats.running} running and "
                    f"{stats.waiting} waiting")
        return None


def _ratio(hits: float, queried: float) -> float | None:
    return min(max(hits / queried, 0.0), 1.0) if queried > 0 else None
