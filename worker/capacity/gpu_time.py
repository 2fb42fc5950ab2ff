"""GPU time per request, estimated from what the worker sees of each replica: when a request was leased to
it, when its first byte came back, and when it ended.

The model. A replica is busy while at least one request is in flight on it. The time between two
consecutive events on a replica is divided among the requests in flight on it in proportion to a weight:
the request's number of sequences (`n` times its prompts: each is a sequence of its own in the batch)
times a phase weight, `prefill_weight` while a streamed request has no first byte yet (its prompt is
being computed) and 1.0 once it decodes. A non-streamed request's first byte is its whole answer, so it
weighs as decoding throughout: most of a generation's time is spent decoding.

Why a prefill weight, and why a small one. vLLM's chunked prefill puts up to `max_num_batched_tokens`
prompt tokens of a prefilling request in a step next to one token per decoding sequence, so the step
that computes a long prompt costs it many times what a decode costs. But the stretch the worker sees
before the first byte is longer than that step: the wait for the step in progress to end, the prefill
step (or steps), and the relay of the first chunk; over that whole stretch the request's share is
closer to a decode's. Against the mock engine's exact accounting on mixed loads (prompts of 5 to 400
words, 4 to 96 output tokens, half streamed, some n=2, 4 to 48 requests in flight), prefill weights
from 1 to 4 came within a few points of each other (on the median 1 was best at light load and 4 at
heavy load; on the p90 and the worst case 1 and 2 were best), so 2 sits between them; at 8 and above
the p90 and worst errors doubled or tripled, short prompts being overcharged. Counting the sequences
mattered most: without it an n=2 request was charged half its time, and the median error was two to
four times larger.

Conservation holds by construction: the shares of every interval sum to its length, so over any window
the requests' seconds sum to the time the replica had at least one request in flight (`busy_seconds`).
It is O(1) per event: a virtual clock advances by dt / (total weight in flight) while anything is in
flight, and a request's share over a stretch of constant weight w is w times the virtual clock's advance.

Events apply at their own time, or at the replica's latest event when they come later than that (a
relay process reports a first byte over its channel, so it may arrive after another event).
"""

from __future__ import annotations

import time
from typing import Any

from worker.gateway.context import RequestContext

DECODE_WEIGHT = 1.0
DEFAULT_PREFILL_WEIGHT = 2.0


def sequences_of(body: dict[str, Any]) -> int:
    """How many sequences a request puts in the engine's batch: `n` per prompt (a completions `prompt` or an
    embeddings `input` may be a list of prompts)."""
    n = body.get("n")
    count = n if isinstance(n, int) and n > 0 else 1
    prompts = body.get("prompt", body.get("input"))
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], str | list):
        count *= len(prompts)
    return count


class ReplicaGpuMeter:
    """One replica's busy time and the virtual clock its requests' shares are read from."""

    __slots__ = ("_busy", "_in_flight", "_last", "_virtual", "_weight")

    def __init__(self) -> None:
        self._last = 0.0
        self._virtual = 0.0  # seconds per unit of weight since the replica was last idle
        self._weight = 0.0  # total weight in flight
        self._in_flight = 0
        self._busy = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def busy_seconds(self, now: float | None = None) -> float:
        """Seconds the replica had at least one request in flight, up to `now` (default: the latest event)."""
        if now is None or not self._in_flight or now <= self._last:
            return self._busy
        return self._busy + (now - self._last)

    def _advance(self, at: float) -> None:
        if at <= self._last:
            return
        if self._in_flight:
            elapsed = at - self._last
            self._virtual += elapsed / self._weight
            self._busy += elapsed
        self._last = at

    def join(self, share: GpuTimeShare, weight: float, at: float) -> None:
        self._advance(at)
        share.meter, share.weight, share.mark = self, weight, self._virtual
        self._weight += weight
        self._in_flight += 1

    def reweight(self, share: GpuTimeShare, weight: float, at: float) -> None:
        self._advance(at)
        share.seconds += share.weight * (self._virtual - share.mark)
        share.mark = self._virtual
        self._weight += weight - share.weight
        share.weight = weight

    def leave(self, share: GpuTimeShare, at: float) -> None:
        self._advance(at)
        share.seconds += share.weight * (self._virtual - share.mark)
        share.meter = None
        self._in_flight -= 1
        if self._in_flight:
            self._weight -= share.weight
        else:  # idle: start afresh (no rounding carried over, and the clock stays small)
            self._weight = self._virtual = 0.0


class GpuTimeShare:
    """One request's share of its replica's busy time (the gateway's `GpuTimer`), in replica-seconds."""

    __slots__ = ("decoding", "mark", "meter", "prefill_weight", "seconds", "sequences", "weight")

    def __init__(self, prefill_weight: float, sequences: int = 1) -> None:
        self.meter: ReplicaGpuMeter | None = None
        self.prefill_weight = prefill_weight
        self.sequences = sequences
        self.weight = 0.0
        self.mark = 0.0
        self.seconds = 0.0
        self.decoding = False

    def start(self, meter: ReplicaGpuMeter, stream: bool, at: float) -> None:
        """In flight on `meter` from `at` (a request re-leased to a sibling keeps what it had used)."""
        if self.meter is not None:
            self.meter.leave(self, at)
        self.decoding = not stream
        phase = DECODE_WEIGHT if self.decoding else self.prefill_weight
        meter.join(self, phase * self.sequences, at)

    def first_byte(self, at: float) -> None:
        if not self.decoding:
            self.decoding = True
            if self.meter is not None:
                self.meter.reweight(self, DECODE_WEIGHT * self.sequences, at)

    def settle(self, at: float) -> float:
        """The request is over on its replica (idempotent): its replica-seconds."""
        if self.meter is not None:
            self.meter.leave(self, at)
        return self.seconds


class GpuTimeMeters:
    """Every replica's meter, by replica id, in the process that leases replicas (the worker process)."""

    def __init__(self, prefill_weight: float = DEFAULT_PREFILL_WEIGHT) -> None:
        if prefill_weight <= 0:
            raise ValueError(f"prefill_weight must be positive, got {prefill_weight}")
        self.prefill_weight = prefill_weight
        self._meters: dict[str, ReplicaGpuMeter] = {}

    def meter(self, replica_id: str) -> ReplicaGpuMeter:
        meter = self._meters.get(replica_id)
        if meter is None:
            meter = self._meters[replica_id] = ReplicaGpuMeter()
        return meter

    def busy_seconds(self, now: float | None = None) -> dict[str, float]:
        """Each replica's busy seconds so far (not yet multiplied by its model's GPUs per replica)."""
        at = time.monotonic() if now is None else now
        return {replica_id: meter.busy_seconds(at) for replica_id, meter in self._meters.items()}

    def started(self, ctx: RequestContext, replica_id: str, at: float) -> GpuTimeShare:
        """`ctx` was leased `replica_id` at `at`: its share, kept as its `gpu_timer`."""
        share = ctx.gpu_timer
        if not isinstance(share, GpuTimeShare):
            share = GpuTimeShare(self.prefill_weight, sequences_of(ctx.body))
            ctx.gpu_timer = share
        share.start(self.meter(replica_id), ctx.stream, at)
        return share
