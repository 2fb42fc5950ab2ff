"""Requests that certainly cannot fit the context are refused early; valid ones never are."""

from __future__ import annotations

import pytest

from worker.capacity.context_length import check_context_length, prompt_tokens_lower_bound
from worker.config import ModelConfig, Pricing
from worker.engines.mock import tokens
from worker.gateway.context import RequestContext
from worker.gateway.errors import api_error
from worker.refusals import Refusal

MAX_MODEL_LEN = 512


def _ctx(endpoint: str, **body: object) -> RequestContext:
    model = ModelConfig(id="m", engine="mock", source="x", engine_args={"max_model_len": MAX_MODEL_LEN},
                        pricing=Pricing(prompt_per_mtok=1, completion_per_mtok=1))
    return RequestContext(request_id="r", endpoint=endpoint, model=model, body={"model": "m", **body},
                          stream=False, client_wants_usage=False, headers={})


def _chat(content: object, **body: object) -> RequestContext:
    return _ctx("chat.completions", messages=[{"role": "user", "content": content}], **body)


def test_max_tokens_over_the_context_is_refused() -> None:
    with pytest.raises(Refusal) as caught:
        check_context_length(_chat("hi", max_tokens=MAX_MODEL_LEN + 1))
    assert api_error(caught.value).status == 400 and api_error(caught.value).code == "context_length_exceeded"
    assert api_error(caught.value).param == "max_tokens"
    with pytest.raises(Refusal) as caught:
        check_context_length(_chat("hi", max_completion_tokens=10_000))
    assert api_error(caught.value).param == "max_completion_tokens"


def test_prompt_plus_max_tokens_over_the_context_is_left_to_the_engine() -> None:
    # vLLM 0.32 caps max_tokens at what the context has left instead of refusing.
    check_context_length(_chat("word " * 400, max_tokens=MAX_MODEL_LEN))


def test_prompt_that_certainly_fills_the_context_is_refused() -> None:
    with pytest.raises(Refusal) as caught:
        check_context_length(_chat("word " * (2 * MAX_MODEL_LEN + 10)))
    assert api_error(caught.value).code == "context_length_exceeded" and api_error(caught.value).param == "messages"
    with pytest.raises(Refusal):
        check_context_length(_ctx("completions", prompt=list(range(MAX_MODEL_LEN))))
    with pytest.raises(Refusal):
        check_context_length(_ctx("completions", prompt=["short", "word " * 2000]))


@pytest.mark.parametrize("content", [
    "word " * (MAX_MODEL_LEN - 20),  # fits with the template
    "x" * 100_000,  # one huge "word": its token count is unknown here
    " " * 50_000,
    [{"type": "text", "text": "word " * 600}, {"type": "image_url", "image_url": {"url": "data:..."}}],
    "詞" * 5000,  # no spaces to count
])
def test_prompts_that_may_fit_are_not_refused(content: object) -> None:
    check_context_length(_chat(content))


def test_truncation_and_embeddings_are_left_to_the_engine() -> None:
    check_context_length(_chat("word " * 5000, truncate_prompt_tokens=100))
    check_context_length(_ctx("embeddings", input="word " * 5000))


@pytest.mark.parametrize("text", [
    "The quick brown fox, jumping over the lazy dog's back!",
    "def f(x):\n    return x  # indentation\n\n\n",
    "word " * 3000,
])
def test_lower_bound_never_exceeds_the_mock_tokenizers_count(text: str) -> None:
    bound = prompt_tokens_lower_bound("completions", {"prompt": text}, limit=1)
    assert bound <= len(tokens.encode(text))
