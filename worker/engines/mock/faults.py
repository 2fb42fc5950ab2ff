"""Failures the mock engine can be told to show (POST /mock/fault), so tests can see the worker cope."""

from __future__ import annotations

import asyncio
import enum

from pydantic import BaseModel, ConfigDict, Field


class FaultMode(str, enum.Enum):
    none = "none"
    crash = "crash"  # the process exits at once with a non-zero status
    hang = "hang"  # the step loop stops; /health still answers 200 and requests still queue
    slow = "slow"  # every step takes `factor` times longer
    abort_midstream = "abort_midstream"  # responses are cut off after `after_tokens` tokens, no [DONE]
    error_midstream = "error_midstream"  # vLLM's in-stream error event after `after_tokens` tokens
    fail_requests = "fail_requests"  # new requests are answered with HTTP 500


class FaultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: FaultMode = FaultMode.none
    factor: float = Field(default=10.0, gt=0)
    after_tokens: int = Field(default=1, ge=0)
    exit_code: int = Field(default=1, ge=1, le=255)


class FaultState:
    """The fault in force; the step loop and the HTTP handlers consult it."""

    def __init__(self) -> None:
        self.spec = FaultSpec()
        self._progress_allowed = asyncio.Event()
        self._progress_allowed.set()

    def apply(self, spec: FaultSpec) -> None:
        self.spec = spec
        if spec.mode is FaultMode.hang:
            self._progress_allowed.clear()
        else:
            self._progress_allowed.set()

    async def wait_until_progress_allowed(self) -> None:
        if not self._progress_allowed.is_set():
            await self._progress_allowed.wait()

    @property
    def slowdown(self) -> float:
        return self.spec.factor if self.spec.mode is FaultMode.slow else 1.0

    @property
    def failing_requests(self) -> bool:
        return self.spec.mode is FaultMode.fail_requests

    def midstream_fault(self, tokens_sent: int) -> FaultMode | None:
        """abort_midstream or error_midstream once a response has carried `after_tokens` tokens."""
        mode = self.spec.mode
        if mode in (FaultMode.abort_midstream, FaultMode.error_midstream) and tokens_sent >= self.spec.after_tokens:
            return mode
        return None
