"""Continuous batching the way vLLM's v1 scheduler does it, with simulated compute.

Each step: running sequences first (decodes take one token, unfinished prefills a chunk), preempting the
newest running sequence when KV blocks run out; then, if nothing was preempted, waiting sequences are
admitted first-come-first-served while there is room in `max_num_seqs`, the token budget and the KV
cache. A waiting sequence first takes the cached blocks that start its prompt (prefix caching), so only
its uncached tokens are computed and charged prefill time. The step then "runs" for the latency model's
time, every sequence whose tokens are all computed samples one new token, and newly full blocks are
cached and published as KV-cache events.

Each step's measured time is the engine's busy time; it is split among the step's sequences by the
latency model's terms (`LatencyModel.shares`) into their `gpu_seconds`, so the sequences' figures sum to
`busy_seconds` exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from worker.engines.kv_events import KvEvent
from worker.engines.mock.faults import FaultState
from worker.engines.mock.kv_cache import BlockPool
from worker.engines.mock.latency import LatencyModel
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.mock.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    prefix_caching: bool = True


class Scheduler:
    def __init__(self, limits: EngineLimits, latency: LatencyModel, metrics: EngineMetrics,
                 faults: FaultState, publish_events: Callable[[list[KvEvent]], None] | None = None) -> None:
        self.limits = limits
        self._latency = latency
        self._metrics = metrics
        self._faults = faults
        self._publish_events = publish_events
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.blocks = BlockPool(limits.num_kv_blocks, limits.block_size, prefix_caching=limits.prefix_caching)
        self._work_arrived = asyncio.Event()
        # Seconds the step loop spent computing steps (the engine's busy time), measured.
        self.busy_seconds = 0.0

    @property
    def free_blocks(self) -> int:
        return self.blocks.free_blocks

    # -- called by request handlers -------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)
        self._work_arrived.set()
        self._publish_load()

    def abort(self, sequence: Sequence) -> None:
        """Drops an unfinished sequence (its client went away) and frees its KV blocks."""
        if sequence.finished:
            return
        if sequence.status is SequenceStatus.RUNNING:
            self.running.remove(sequence)
        else:
            self.waiting.remove(sequence)
        sequence.finish_reason = "abort"
        self._finish(sequence, time.monotonic())
        self._publish_load()
        self._flush_events()

    # -- the step loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._faults.wait_until_progress_allowed()
            plan, prefills = self._schedule(time.monotonic())
            if not plan:
                self._work_arrived.clear()
                await self._work_arrived.wait()
                continue
            delay = self._latency.step_seconds(len(plan), sum(prefills), self._faults.slowdown)
            started = time.monotonic()
            await asyncio.sleep(delay)
            now = time.monotonic()
            self.account(plan, prefills, now - started)
            self.complete(plan, now)

    def account(self, plan: list[tuple[Sequence, int]], prefills: list[int], elapsed_s: float) -> None:
        """The step took `elapsed_s`: each planned sequence (aborted meanwhile or not) is charged its share."""
        self.busy_seconds += elapsed_s
        self._metrics.busy(elapsed_s)
        for (sequence, _), share in zip(plan, self._latency.shares(prefills, elapsed_s), strict=True):
            sequence.gpu_seconds += share

    def schedule(self, now: float) -> tuple[list[tuple[Sequence, int]], int]:
        """First half of a step: which sequences compute how many tokens, and how many are prefill."""
        plan, prefills = self._schedule(now)
        return plan, sum(prefills)

    def _schedule(self, now: float) -> tuple[list[tuple[Sequence, int]], list[int]]:
        """The step's plan and, for each planned sequence, how many of its tokens are prefill."""
        budget = self.limits.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        prefills: list[int] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            new_tokens = min(sequence.total_tokens - sequence.num_computed, budget)
            scheduled = True
            while not self._allocate(sequence, new_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is sequence:
                    scheduled = False
                    break
            if not scheduled:
                break
            plan.append((sequence, new_tokens))
            prefills.append(0 if _is_decode(sequence) else new_tokens)
            budget -= new_tokens
            index += 1

        # Like vLLM: no admissions in a step that had to preempt.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.limits.max_num_seqs):
            sequence = self.waiting[0]
            hits = self.blocks.computed_blocks(sequence)
            hit_tokens = len(hits) * self.limits.block_size
            new_tokens = min(sequence.total_tokens - hit_tokens, budget)
            if not self.blocks.allocate(sequence, new_tokens, hits):
                break
            if self.limits.prefix_caching:
                self._metrics.prefix_cache_queried(sequence.total_tokens, hit_tokens)
            sequence.num_computed = hit_tokens
            if sequence.cached_tokens is None:
                sequence.cached_tokens = hit_tokens
            self.waiting.popleft()
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            if sequence.first_scheduled_at is None:
                sequence.first_scheduled_at = now
                self._metrics.scheduled_first_time(now - sequence.arrival)
            plan.append((sequence, new_tokens))
            prefills.append(new_tokens)
            budget -= new_tokens
        self._publish_load()
        return plan, prefills

    def complete(self, plan: list[tuple[Sequence, int]], now: float) -> None:
        """Second half of a step: the planned tokens are computed; finished prompts sample a token."""
        generated = 0
        any_finished = False
        for sequence, new_tokens in plan:
            if sequence.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            sequence.num_computed += new_tokens
            self.blocks.cache_full_blocks(sequence)
            if sequence.num_computed < sequence.total_tokens:
                continue  # a chunk of a longer prefill
            if sequence.output_tokens == 0:
                # Like vLLM's created_cache_tokens: prompt tokens this prefill added to the cache.
                cached_now = min(sequence.num_cached_blocks * self.limits.block_size, sequence.prompt_tokens)
                sequence.created_cache_tokens = max(0, cached_now - (sequence.cached_tokens or 0))
            if sequence.max_tokens == 0:
                self._metrics.prompt_done(sequence.prompt_tokens, None)
                sequence.finish_reason = "stop"
                done = True
            else:
                if sequence.first_token_at is None:
                    sequence.first_token_at = now
                    self._metrics.prompt_done(sequence.prompt_tokens, now - sequence.arrival)
                else:
                    self._metrics.inter_token(now - (sequence.last_token_at or now))
                sequence.last_token_at = now
                generated += 1
                done = sequence.append_token()
            if done:
                self._finish(sequence, now)
                any_finished = True
            sequence.notify.set()
        if generated:
            self._metrics.generated(generated)
        if any_finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        self._publish_load()
        self._flush_events()

    # -- KV blocks ------------------------------------------------------------------------------

    def _allocate(self, sequence: Sequence, new_tokens: int) -> bool:
        return self.blocks.allocate(sequence, new_tokens)

    def _release(self, sequence: Sequence) -> None:
        self.blocks.free(sequence)

    def _flush_events(self) -> None:
        """Hands this step's KV-cache events to the publisher (vLLM publishes once per engine step)."""
        events = self.blocks.take_events()
        if events and self._publish_events is not None:
            self._publish_events(events)

    def _preempt(self, sequence: Sequence) -> None:
        """Recompute-style preemption: blocks are dropped and the sequence queues first in line."""
        self._release(sequence)
        sequence.num_computed = 0
        sequence.status = SequenceStatus.WAITING
        self.waiting.appendleft(sequence)
        self._metrics.preempted()
        logger.debug("sequence preempted", extra={"request_id": sequence.request_id})

    def _finish(self, sequence: Sequence, now: float) -> None:
        self._release(sequence)
        sequence.status = SequenceStatus.FINISHED
        self._metrics.finished(sequence.finish_reason or "stop", now - sequence.arrival)
        sequence.notify.set()

    def _publish_load(self) -> None:
        self._metrics.set_load(len(self.running), len(self.waiting), self.blocks.usage())


def _is_decode(sequence: Sequence) -> bool:
    return sequence.output_tokens > 0 and sequence.total_tokens - sequence.num_computed == 1
