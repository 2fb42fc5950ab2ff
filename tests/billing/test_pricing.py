"""Costs in exact decimal, rounded to micro-USD; who pays for what; the worst case reserved up front."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.billing.support import chat_model
from worker.billing.money import micro_to_json_number, micro_to_usd_text, usd_to_micro
from worker.billing.pricing import (
    RequestShape,
    billable_usage,
    charge_micro,
    cost_micro,
    cost_usd,
    worst_case_micro,
)
from worker.config import Pricing
from worker.gateway.context import Usage

PRICES = Pricing(prompt_per_mtok=Decimal("0.13"), completion_per_mtok=Decimal("0.38"))


def test_cost_is_exact_decimal() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert cost_usd(PRICES, usage) == Decimal("0.51")
    assert cost_micro(PRICES, usage) == 510_000
    # 0.1 + 0.2 style sums stay exact: 3 tokens at 0.1/Mtok.
    tenth = Pricing(prompt_per_mtok=Decimal("0.1"), completion_per_mtok=Decimal("0.2"))
    assert cost_usd(tenth, Usage(prompt_tokens=10, completion_tokens=10)) == Decimal("0.000003")


def test_cost_rounds_half_up_to_the_micro_usd() -> None:
    one = Pricing(prompt_per_mtok=Decimal(1), completion_per_mtok=Decimal(0))
    assert cost_micro(one, Usage(prompt_tokens=1, completion_tokens=1)) == 1
    price = Pricing(prompt_per_mtok=Decimal("0.5"), completion_per_mtok=Decimal(0))
    assert cost_micro(price, Usage(prompt_tokens=1)) == 1  # 0.5 micro-USD rounds up
    assert cost_micro(price, Usage(prompt_tokens=3)) == 2  # 1.5 -> 2
    price = Pricing(prompt_per_mtok=Decimal("0.4"), completion_per_mtok=Decimal(0))
    assert cost_micro(price, Usage(prompt_tokens=1)) == 0  # 0.4 micro-USD rounds down


def test_cached_prompt_tokens_use_the_cached_price() -> None:
    cached = Pricing(
        prompt_per_mtok=Decimal(2), completion_per_mtok=Decimal(4), cached_prompt_per_mtok=Decimal("0.5")
    )
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=400)
    # 600 * 2 + 400 * 0.5 + 100 * 4 = 1800 per million
    assert cost_micro(cached, usage) == 1800
    # Without a cached price, cached tokens cost the normal prompt price.
    plain = Pricing(prompt_per_mtok=Decimal(2), completion_per_mtok=Decimal(4))
    assert cost_micro(plain, usage) == 2400


def test_cached_count_never_exceeds_prompt_count() -> None:
    cached = Pricing(
        prompt_per_mtok=Decimal(2), completion_per_mtok=Decimal(0), cached_prompt_per_mtok=Decimal(0)
    )
    assert cost_micro(cached, Usage(prompt_tokens=10, completion_tokens=1, cached_tokens=50)) == 0


def test_per_request_fee_is_added() -> None:
    fee = Pricing(prompt_per_mtok=Decimal(0), completion_per_mtok=Decimal(0), request=Decimal("0.0015"))
    assert cost_micro(fee, Usage(prompt_tokens=5, completion_tokens=5)) == 1500


@pytest.mark.parametrize(
    ("usage", "finish", "outcome", "endpoint", "billed"),
    [
        (Usage(10, 5), "stop", "ok", "chat.completions", True),
        (Usage(10, 0), "stop", "ok", "chat.completions", False),  # nothing generated
        (Usage(10, 5), "error", "ok", "chat.completions", False),  # error finish reason
        (Usage(10, 5), None, "engine_error", "chat.completions", False),
        (Usage(10, 5), None, "upstream_failed", "completions", False),
        (Usage(10, 5), None, "rejected", "chat.completions", False),
        (Usage(0, 7), None, "client_disconnected", "chat.completions", True),  # pays for what was generated
        (None, None, "client_disconnected", "chat.completions", False),
        (Usage(12, 0), None, "ok", "embeddings", True),  # embeddings have no completion
    ],
)
def test_who_pays(usage: Usage | None, finish: str | None, outcome: str, endpoint: str, billed: bool) -> None:
    assert (billable_usage(endpoint, usage, finish, outcome) is not None) is billed
    charge = charge_micro(chat_model(), endpoint, usage, finish, outcome)
    assert (charge > 0) is billed


def test_worst_case_covers_any_real_outcome() -> None:
    model = chat_model(cached_prompt_per_mtok=Decimal(3))  # cached dearer than prompt: still covered
    body = {"messages": [{"role": "user", "content": "héllo wörld " * 20}]}
    shape = RequestShape.of("chat.completions", body, 50)
    assert shape.prompt_bound >= len(("héllo wörld " * 20).encode())
    worst = worst_case_micro(model, shape)
    for prompt in (0, 100, shape.prompt_bound):
        for cached in (0, prompt):
            real = cost_micro(
                model.pricing, Usage(prompt_tokens=prompt, completion_tokens=50, cached_tokens=cached)
            )
            assert real <= worst


def test_worst_case_without_max_tokens_is_bounded_by_the_context_window() -> None:
    model = chat_model()  # max_model_len 1000, prompt 1/Mtok, completion 2/Mtok
    # The whole window at the dearer price is 2000 micro-USD; prompt + a window of completion would be more.
    assert worst_case_micro(model, RequestShape(prompt_bound=100, sequences=1, max_tokens=None)) == 2000
    assert worst_case_micro(model, RequestShape(prompt_bound=100, sequences=1, max_tokens=10)) == 120
    assert worst_case_micro(model, RequestShape(prompt_bound=100, sequences=0, max_tokens=None)) == 100


@pytest.mark.parametrize(
    ("endpoint", "body", "sequences"),
    [
        ("chat.completions", {"messages": [], "n": 3}, 3),
        ("chat.completions", {"messages": [], "n": None}, 1),
        ("completions", {"prompt": ["a", "b"], "n": 2}, 4),
        ("completions", {"prompt": [1, 2, 3], "best_of": 3}, 3),  # one prompt given as token ids
        ("completions", {"prompt": [[1, 2], [3]]}, 2),
        ("embeddings", {"input": ["a", "b"]}, 0),
    ],
)
def test_every_generated_sequence_is_reserved(endpoint: str, body: dict, sequences: int) -> None:
    shape = RequestShape.of(endpoint, body, 10)
    assert shape.sequences == sequences
    if sequences:
        model = chat_model()
        single = worst_case_micro(model, RequestShape(shape.prompt_bound, 1, 10))
        assert worst_case_micro(model, shape) == single + (sequences - 1) * 10 * 2


def test_worst_case_rounds_up() -> None:
    model = chat_model(prompt_per_mtok=Decimal("0.4"), completion_per_mtok=Decimal(0))
    assert worst_case_micro(model, RequestShape(prompt_bound=1, sequences=1, max_tokens=0)) == 1


def test_usd_amounts_convert_exactly() -> None:
    assert usd_to_micro("25") == 25_000_000
    assert usd_to_micro(Decimal("0.000001")) == 1
    assert usd_to_micro("-1.5") == -1_500_000
    with pytest.raises(ValueError):
        usd_to_micro("0.0000001")
    with pytest.raises(ValueError):
        usd_to_micro("ten")
    with pytest.raises(ValueError):
        usd_to_micro("NaN")
    assert micro_to_usd_text(1_234_567) == "1.234567"
    assert micro_to_usd_text(-5) == "-0.000005"
    assert micro_to_json_number(123) == 0.000123
