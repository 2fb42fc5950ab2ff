"""How long one engine step takes: a linear model of batch size and prefill work."""

from __future__ import annotations

from dataclasses import dataclass

from worker.config import MockEngineConfig


@dataclass(frozen=True, slots=True)
class LatencyModel:
    base_s: float
    per_seq_s: float
    per_prefill_token_s: float

    @classmethod
    def from_config(cls, config: MockEngineConfig) -> LatencyModel:
        return cls(
            base_s=config.step_base_ms / 1000.0,
            per_seq_s=config.step_per_seq_ms / 1000.0,
            per_prefill_token_s=config.prefill_per_token_ms / 1000.0,
        )

    def step_seconds(self, batch_size: int, prefill_tokens: int, slowdown: float = 1.0) -> float:
        """Seconds one step of `batch_size` sequences takes; 0 means "no compute, just yield"."""
        return slowdown * (self.base_s + self.per_seq_s * batch_size + self.per_prefill_token_s * prefill_tokens)
