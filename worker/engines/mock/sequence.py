"""One sequence inside the mock engine: its progress, KV blocks, output text and stop-string check."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from worker.engines.mock.tokens import TokenSampler


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that could still start one.

    A stop string that completes with a new token starts at most `len(stop) - 1` characters before that
    token, so holding back that many characters is enough (vLLM's detokenizer does the same).
    """

    __slots__ = ("_held", "_hold", "_include", "_stops")

    def __init__(self, stops: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        self._stops = stops
        self._include = include_stop_str_in_output
        self._hold = max(len(s) for s in stops) - 1
        self._held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Returns the text now safe to release and the stop string that matched, if any."""
        buffer = self._held + piece
        match: tuple[int, str] | None = None
        for stop in self._stops:
            position = buffer.find(stop)
            if position >= 0 and (match is None or position < match[0]):
                match = (position, stop)
        if match is not None:
            position, stop = match
            self._held = ""
            return buffer[: position + len(stop) if self._include else position], stop
        if len(buffer) <= self._hold:
            self._held = buffer
            return "", None
        cut = len(buffer) - self._hold
        self._held = buffer[cut:]
        return buffer[:cut], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass(eq=False, slots=True)
class Sequence:
    """One engine request. `n` choices of an HTTP request are `n` sequences sharing one `notify` event."""

    request_id: str
    prompt_tokens: int
    max_tokens: int  # 0: a pooling request, done once its prompt is computed
    sampler: TokenSampler | None
    stop: StopMatcher | None
    notify: asyncio.Event
    arrival: float
    # Prompt then generated token ids: what the KV cache holds and prefix caching hashes.
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of its full blocks so far
    num_cached_blocks: int = 0  # leading blocks already in the prefix cache (hits or stored by it)
    cached_tokens: int | None = None  # prompt tokens found cached when it was first scheduled
    created_cache_tokens: int = 0  # prompt tokens it added to the cache by the end of its prefill
    output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | None = None
    first_scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Its share of the engine's busy time so far (the scheduler's step accounting).
    gpu_seconds: float = 0.0
    # Output the HTTP side has not taken yet (text pieces and their token count).
    pending_text: list[str] = field(default_factory=list)
    pending_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self) -> bool:
        """Samples the next token; returns True when it ends the sequence (finish_reason is then set)."""
        assert self.sampler is not None
        token = self.sampler.next_token()
        piece = token.text
        self.token_ids.append(token.token_id)
        self.output_tokens += 1
        self.pending_tokens += 1
        if self.stop is not None:
            released, matched = self.stop.feed(piece)
            if released:
                self.pending_text.append(released)
            if matched is not None:
                self.finish_reason, self.stop_reason = "stop", matched
                return True
        else:
            self.pending_text.append(piece)
        if self.output_tokens >= self.max_tokens:
            self.finish_reason = "length"
            if self.stop is not None:
                self.pending_text.append(self.stop.flush())
            return True
        return False

    def take_output(self) -> tuple[str, int]:
        """New text and new token count since the last call."""
        text = "".join(self.pending_text) if len(self.pending_text) != 1 else self.pending_text[0]
        tokens = self.pending_tokens
        self.pending_text.clear()
        self.pending_tokens = 0
        return text, tokens
