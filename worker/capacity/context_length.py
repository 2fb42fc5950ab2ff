"""Refuse requests that cannot fit the model's context before they reach an engine, when that is cheap to know.

Only certain cases are refused, mirroring the engine's own rules (vLLM 0.32): `max_tokens` above
`max_model_len`, or a prompt that leaves no room for one output token. A prompt's token count is
bounded from below by its whitespace-separated words, halved: tokenizers rarely merge words, and the
halving leaves room for those that do. A prompt given as token ids is counted exactly. Everything
else is left to the engine, whose 400 the gateway passes on.
"""

from __future__ import annotations

from typing import Any

from worker.gateway.context import RequestContext
from worker.refusals import ContextTooLong


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _words_lower_bound(texts: list[str], limit: int) -> int:
    # Words can be no more than half the characters: skip the split when even that is under the limit.
    if sum(len(text) + 1 for text in texts) // 2 // 2 < limit:
        return 0
    return sum(len(text.split()) for text in texts) // 2


def prompt_tokens_lower_bound(endpoint: str, body: dict[str, Any], limit: int) -> int:
    """A number of prompt tokens the request certainly has (exact only for token-id prompts).

    Small prompts answer 0 without being scanned: `limit` is the count that would matter.
    """
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        return _words_lower_bound(texts, limit)
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return _words_lower_bound([prompt], limit)
        if isinstance(prompt, list) and prompt:
            if all(isinstance(item, int) for item in prompt):
                return len(prompt)
            # A batch of prompts: each must fit on its own.
            return max(
                (len(item) if isinstance(item, list) else _words_lower_bound([item], limit)
                 for item in prompt if isinstance(item, (str, list))),
                default=0,
            )
    return 0


def check_context_length(ctx: RequestContext) -> None:
    """Raise ContextTooLong when the request certainly cannot fit the model."""
    if ctx.endpoint == "embeddings":
        return
    max_model_len = ctx.model.max_model_len
    body = ctx.body
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = ctx.max_tokens
    if max_tokens is not None and max_tokens > max_model_len:
        raise ContextTooLong(f"{param}={max_tokens} cannot be greater than max_model_len={max_model_len}. "
                             "Please request fewer output tokens.", param=param)
    if body.get("truncate_prompt_tokens") is not None:
        return  # the engine cuts the prompt down itself
    prompt_tokens = prompt_tokens_lower_bound(ctx.endpoint, body, max_model_len)
    if prompt_tokens >= max_model_len:
        raise ContextTooLong(f"This model's maximum context length is {max_model_len} tokens. However, your "
                             f"prompt contains at least {prompt_tokens} input tokens, which leaves no room for "
                             "output. Please reduce the length of the input prompt.",
                             param="messages" if ctx.endpoint == "chat.completions" else "prompt")
