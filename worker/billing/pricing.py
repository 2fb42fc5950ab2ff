"""What a request costs: the real charge from the engine's token counts, and the worst case held up front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from worker.billing.money import ceil_usd_to_micro, round_usd_to_micro
from worker.config import ModelConfig, Pricing
from worker.gateway.context import Usage

_PER_MILLION = Decimal(1_000_000)
_BYTES_PER_TOKEN = 4
# Chat templates add role markers and default system text that the JSON body does not contain.
_TEMPLATE_OVERHEAD_TOKENS = 64
# Outcomes in which the user received nothing they should pay for.
_UNBILLED_OUTCOMES = frozenset({"engine_error", "upstream_failed", "rejected", "invalid_request", "worker_error"})


def cost_usd(pricing: Pricing, usage: Usage) -> Decimal:
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    cached_price = (
        pricing.cached_prompt_per_mtok
        if pricing.cached_prompt_per_mtok is not None
        else pricing.prompt_per_mtok
    )
    per_mtok = (
        (usage.prompt_tokens - cached) * pricing.prompt_per_mtok
        + cached * cached_price
        + usage.completion_tokens * pricing.completion_per_mtok
    )
    return per_mtok / _PER_MILLION + pricing.request


def cost_micro(pricing: Pricing, usage: Usage) -> int:
    return round_usd_to_micro(cost_usd(pricing, usage))


def billable_usage(
    endpoint: str, usage: Usage | None, finish_reason: str | None, outcome: str
) -> Usage | None:
    """The usage the user pays for, or None when the request is free.

    Routers do not charge for an error finish reason or for a generation with no completion tokens; a
    client that disconnected after its request reached the engine pays for its prompt (the engine's
    prefill) and what was generated before it left. Embeddings have no completion.
    """
    if usage is None or outcome in _UNBILLED_OUTCOMES or finish_reason == "error":
        return None
    if outcome == "client_disconnected":
        return usage if usage.prompt_tokens > 0 or usage.completion_tokens > 0 else None
    if endpoint != "embeddings" and usage.completion_tokens <= 0:
        return None
    return usage


def charge_micro(
    model: ModelConfig, endpoint: str, usage: Usage | None, finish_reason: str | None, outcome: str
) -> int:
    billable = billable_usage(endpoint, usage, finish_reason, outcome)
    return cost_micro(model.pricing, billable) if billable is not None else 0


def prompt_token_bound(endpoint: str, body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens without a tokenizer.

    Byte-level BPE tokenizers never produce more tokens than the text has bytes, and the JSON of the
    prompt is longer than its text, so the JSON size plus the template overhead bounds the count.
    """
    fields = {
        "chat.completions": ("messages", "tools", "functions"),
        "completions": ("prompt", "suffix"),
        "embeddings": ("input",),
    }.get(endpoint, ("messages", "prompt", "input"))
    size = sum(len(orjson.dumps(body[name])) for name in fields if body.get(name) is not None)
    return size + _TEMPLATE_OVERHEAD_TOKENS


def generated_sequences(endpoint: str, body: dict[str, Any]) -> int:
    """How many completions one request can generate: `n` (or `best_of`) per prompt, and /v1/completions
    accepts a list of prompts."""
    if endpoint == "embeddings":
        return 0
    per_prompt = _count(body.get("n"))
    if endpoint != "completions":
        return per_prompt
    per_prompt = max(per_prompt, _count(body.get("best_of")))
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return per_prompt * prompts


@dataclass(frozen=True)
class RequestShape:
    """What bounds a request's cost before it runs."""

    prompt_bound: int  # tokens, never fewer than the engine will count
    sequences: int  # completions it can generate; 0 for embeddings
    max_tokens: int | None  # per completion, as the client asked

    @classmethod
    def of(cls, endpoint: str, body: dict[str, Any], max_tokens: int | None) -> RequestShape:
        return cls(prompt_token_bound(endpoint, body), generated_sequences(endpoint, body), max_tokens)

    def likely_tokens(self, window: int) -> int:
        """What tokens-per-minute limits debit up front (corrected once the real count is known): the
        prompt at about four bytes per token, as OpenAI estimates, plus every completion budget."""
        estimate = math.ceil(self.prompt_bound / _BYTES_PER_TOKEN) + self.sequences * (self.max_tokens or 0)
        return min(estimate, max(self.sequences, 1) * window)


def worst_case_micro(model: ModelConfig, shape: RequestShape) -> int:
    """The most this request can cost, rounded up: reserved before the engine sees it.

    Two upper bounds hold and the smaller wins: the prompt bound plus every sequence's completion budget
    at their prices; and, since a prompt and each of its completions fit in the context window, the
    window at the dearer token price once per generated sequence.
    """
    pricing = model.pricing
    window = model.max_model_len
    prompt_price = max(pricing.prompt_per_mtok, pricing.cached_prompt_per_mtok or Decimal(0))
    if shape.sequences == 0:
        return ceil_usd_to_micro(shape.prompt_bound * prompt_price / _PER_MILLION + pricing.request)
    max_tokens = shape.max_tokens
    budget = min(max_tokens, window) if max_tokens is not None and max_tokens >= 0 else window
    by_request = shape.prompt_bound * prompt_price + shape.sequences * budget * pricing.completion_per_mtok
    by_window = shape.sequences * window * max(prompt_price, pricing.completion_per_mtok)
    return ceil_usd_to_micro(min(by_request, by_window) / _PER_MILLION + pricing.request)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1
