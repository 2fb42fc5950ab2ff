"""One `/metrics` scrape of a vLLM-compatible engine, reduced to the numbers admission decides on."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Prometheus sample name -> EngineStats field. Several samples of one name (data-parallel engines,
# finish reasons) add up; the KV-cache gauge keeps the fullest engine instead.
_SUMMED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:num_preemptions_total": "num_preemptions",
    "vllm:request_success_total": "requests_finished_total",
    # Prompt tokens looked up in the prefix cache, and those found there (vLLM >= 0.10 and the mock).
    "vllm:prefix_cache_queries_total": "prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
}
# `vllm:gpu_cache_usage_perc` is the pre-0.10 name of the same gauge.
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_REQUIRED = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# Everything `from_vllm_scrape` reads: the samples to ask a Prometheus exporter for (`name[]=`).
ADMISSION_SAMPLES = (*_SUMMED, *_KV_USAGE)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    generation_tokens_total: float
    prompt_tokens_total: float
    num_preemptions: float
    requests_finished_total: float
    scraped_at: float  # time.monotonic() when the scrape was answered
    prefix_cache_queries_total: float = 0.0
    prefix_cache_hits_total: float = 0.0

    @property
    def tokens_total(self) -> float:
        """Every token the engine has processed; it moves whenever the engine makes progress."""
        return self.generation_tokens_total + self.prompt_tokens_total

    @classmethod
    def from_vllm_scrape(cls, text: str, scraped_at: float | None = None) -> EngineStats:
        """Parse vLLM's Prometheus text; raises ValueError when the text is not an engine's /metrics page."""
        sums = dict.fromkeys(_SUMMED.values(), 0.0)
        kv_usage = 0.0
        seen: set[str] = set()
        for line in text.splitlines():
            if not line.startswith("vllm:"):
                continue  # comments, blank lines and other exporters' metrics
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name, rest = line[:brace], line[line.rfind("}") + 1:]
            else:
                name, rest = line[:space], line[space:]
            field = _SUMMED.get(name)
            if field is None and name not in _KV_USAGE:
                continue
            try:
                value = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
            seen.add(name)
            if math.isnan(value):  # an engine that has not reported yet
                continue
            if field is not None:
                sums[field] += value
            else:
                kv_usage = max(kv_usage, value)
        missing = [name for name in _REQUIRED if name not in seen]
        if missing:
            raise ValueError(f"not a vLLM metrics page: {', '.join(missing)} missing")
        return cls(
            running=int(sums["running"]),
            waiting=int(sums["waiting"]),
            kv_cache_usage=min(max(kv_usage, 0.0), 1.0),
            generation_tokens_total=sums["generation_tokens_total"],
            prompt_tokens_total=sums["prompt_tokens_total"],
            num_preemptions=sums["num_preemptions"],
            requests_finished_total=sums["requests_finished_total"],
            scraped_at=time.monotonic() if scraped_at is None else scraped_at,
            prefix_cache_queries_total=sums["prefix_cache_queries_total"],
            prefix_cache_hits_total=sums["prefix_cache_hits_total"],
        )
