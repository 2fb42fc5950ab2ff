"""What a request costs: the real charge from the engine's token counts, and the worst case reserved up front."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from worker.billing.money import ceil_usd_to_micro, round_usd_to_micro
from worker.config import ModelConfig, Pricing
from worker.gateway.context import Usage

_PER_MILLION = Decimal(1_000_000)
# Chat templates add role markers and default system text that the JSON body does not contain.
_TEMPLATE_OVERHEAD_TOKENS = 64
# Outcomes in which the user received nothing they should pay for.
_UNBILLED_OUTCOMES = frozenset({"engine_error", "upstream_failed", "rejected", "invalid_request"})


def cost_usd(pricing: Pricing, usage: Usage) -> Decimal:
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    cached_price = pricing.cached_prompt_per_mtok if pricing.cached_prompt_per_mtok is not None \
        else pricing.prompt_per_mtok
    per_mtok = (
        (usage.prompt_tokens - cached) * pricing.prompt_per_mtok
        + cached * cached_price
        + usage.completion_tokens * pricing.completion_per_mtok
    )
    return per_mtok / _PER_MILLION + pricing.request


def cost_micro(pricing: Pricing, usage: Usage) -> int:
    return round_usd_to_micro(cost_usd(pricing, usage))


def billable_usage(endpoint: str, usage: Usage | None, finish_reason: str | None, outcome: str) -> Usage | None:
    """The usage the user pays for, or None when the request is free.

    Routers do not charge for an error finish reason or for a generation with no completion tokens; a
    client that disconnected pays for what was generated before it left. Embeddings have no completion.
    """
    if usage is None or outcome in _UNBILLED_OUTCOMES or finish_reason == "error":
        return None
    if endpoint != "embeddings" and usage.completion_tokens <= 0:
        return None
    return usage


def charge_micro(model: ModelConfig, endpoint: str, usage: Usage | None, finish_reason: str | None,
                 outcome: str) -> int:
    billable = billable_usage(endpoint, usage, finish_reason, outcome)
    return cost_micro(model.pricing, billable) if billable is not None else 0


def prompt_token_bound(endpoint: str, body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens without a tokenizer.

    Byte-level BPE tokenizers never produce more tokens than the text has bytes, and the JSON of the
    prompt is longer than its text, so the JSON size plus the template overhead bounds the count.
    """
    fields = {"chat.completions": ("messages", "tools"), "completions": ("prompt", "suffix"),
              "embeddings": ("input",)}.get(endpoint, ("messages", "prompt", "input"))
    size = sum(len(orjson.dumps(body[name])) for name in fields if body.get(name) is not None)
    return size + _TEMPLATE_OVERHEAD_TOKENS


def worst_case_micro(model: ModelConfig, endpoint: str, prompt_bound: int, max_tokens: int | None) -> int:
    """The most this request can cost, rounded up: reserved before the engine sees it.

    Two upper bounds hold and the smaller wins: the prompt bound plus the completion budget at their
    prices, and the whole context window at the dearer token price (an engine never exceeds it).
    """
    pricing = model.pricing
    window = model.max_model_len
    prompt_price = max(pricing.prompt_per_mtok, pricing.cached_prompt_per_mtok or Decimal(0))
    prompt_tokens = min(prompt_bound, window)
    if endpoint == "embeddings":
        completion_budget = 0
    else:
        completion_budget = min(max_tokens if max_tokens is not None and max_tokens >= 0 else window, window)
    by_request = prompt_tokens * prompt_price + completion_budget * pricing.completion_per_mtok
    by_window = window * max(prompt_price, pricing.completion_per_mtok)
    return ceil_usd_to_micro(min(by_request, by_window) / _PER_MILLION + pricing.request)
