"""How long one engine step takes: a linear model of batch size and prefill work, and who used it."""

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

    def shares(self, prefill_tokens: list[int], elapsed_s: float) -> list[float]:
        """`elapsed_s`, the measured time of one step, split among its sequences (their prefill tokens in it,
        0 for a decode) by the model's terms: `base_s` shared equally, `per_seq_s` each, and
        `per_prefill_token_s` per prefill token. Scaled to sum to `elapsed_s` (a slowdown or a late wake-up
        stretches every term alike); equal shares when every term is zero."""
        count = len(prefill_tokens)
        if count == 0:
            return []
        fixed = self.base_s / count + self.per_seq_s
        nominal = [fixed + self.per_prefill_token_s * tokens for tokens in prefill_tokens]
        total = sum(nominal)
        if total <= 0.0:
            return [elapsed_s / count] * count
        scale = elapsed_s / total
        return [share * scale for share in nominal]
