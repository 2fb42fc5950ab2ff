"""Continuous batching the way vLLM's v1 scheduler does it, with simulated compute.

Each step: running sequences first (decodes take one token, unfinished prefills a chunk), preempting the
newest running sequence when KV blocks run out; then, if nothing was preempted, waiting sequences are
admitted first-come-first-served while there is room in `max_num_seqs`, the token budget and the KV
cache. The step then "runs" for the latency model's time, and every sequence whose tokens are all
computed samples one new token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from worker.engines.mock.faults import FaultState
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


class Scheduler:
    def __init__(self, limits: EngineLimits, latency: LatencyModel, metrics: EngineMetrics,
                 faults: FaultState) -> None:
        self.limits = limits
        self._latency = latency
        self._metrics = metrics
        self._faults = faults
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_blocks = limits.num_kv_blocks
        self._work_arrived = asyncio.Event()

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

    # -- the step loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._faults.wait_until_progress_allowed()
            plan, prefill_tokens = self.schedule(time.monotonic())
            if not plan:
                self._work_arrived.clear()
                await self._work_arrived.wait()
                continue
            delay = self._latency.step_seconds(len(plan), prefill_tokens, self._faults.slowdown)
            await asyncio.sleep(delay)
            self.complete(plan, time.monotonic())

    def schedule(self, now: float) -> tuple[list[tuple[Sequence, int]], int]:
        """First half of a step: which sequences compute how many tokens, and how many are prefill."""
        budget = self.limits.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        prefill_tokens = 0
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
            budget -= new_tokens
            if not _is_decode(sequence):
                prefill_tokens += new_tokens
            index += 1

        # Like vLLM: no admissions in a step that had to preempt.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.limits.max_num_seqs):
            sequence = self.waiting[0]
            new_tokens = min(sequence.total_tokens - sequence.num_computed, budget)
            if not self._allocate(sequence, new_tokens):
                break
            self.waiting.popleft()
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            if sequence.first_scheduled_at is None:
                sequence.first_scheduled_at = now
                self._metrics.scheduled_first_time(now - sequence.arrival)
            plan.append((sequence, new_tokens))
            budget -= new_tokens
            prefill_tokens += new_tokens
        self._publish_load()
        return plan, prefill_tokens

    def complete(self, plan: list[tuple[Sequence, int]], now: float) -> None:
        """Second half of a step: the planned tokens are computed; finished prompts sample a token."""
        generated = 0
        any_finished = False
        for sequence, new_tokens in plan:
            if sequence.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            sequence.num_computed += new_tokens
            if sequence.num_computed < sequence.total_tokens:
                continue  # a chunk of a longer prefill
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

    # -- KV blocks ------------------------------------------------------------------------------

    def _allocate(self, sequence: Sequence, new_tokens: int) -> bool:
        needed = -(-(sequence.num_computed + new_tokens) // self.limits.block_size) - sequence.num_blocks
        if needed > self.free_blocks:
            return False
        if needed > 0:
            self.free_blocks -= needed
            sequence.num_blocks += needed
        return True

    def _release(self, sequence: Sequence) -> None:
        self.free_blocks += sequence.num_blocks
        sequence.num_blocks = 0

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
        used = self.limits.num_kv_blocks - self.free_blocks
        self._metrics.set_load(len(self.running), len(self.waiting), used / self.limits.num_kv_blocks)


def _is_decode(sequence: Sequence) -> bool:
    return sequence.output_tokens > 0 and sequence.total_tokens - sequence.num_computed == 1
