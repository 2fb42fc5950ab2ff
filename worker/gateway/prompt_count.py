"""The prompt tokens of a request that ended before the engine reported its usage.

A client that leaves mid-stream still used the engine's prefill of its whole prompt, but the engine's
usage chunk comes only at the end. The prompt is then counted with the model's own tokenizer, through the
engine's `/tokenize` endpoint (vLLM's and the mock's), and estimated from its size when no engine answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import orjson

from worker.gateway.context import RequestContext, Usage, UsageSource

if TYPE_CHECKING:
    from worker.engines.data_client import EngineDataClient

logger = logging.getLogger(__name__)

TOKENIZE_TIMEOUT_S = 5.0
BYTES_PER_TOKEN = 4


def _tokenize_requests(ctx: RequestContext) -> tuple[list[dict[str, Any]], int]:
    """What to ask `/tokenize` (one request per prompt), and the tokens already known (token-id prompts)."""
    body, model = ctx.body, ctx.model.id
    if ctx.endpoint == "chat.completions":
        ask: dict[str, Any] = {"model": model, "messages": body["messages"], "add_generation_prompt": True}
        if body.get("tools"):
            ask["tools"] = body["tools"]
        return [ask], 0
    prompt = body.get("prompt" if ctx.endpoint == "completions" else "input")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    items = [prompt] if single else list(prompt or ())
    known = sum(len(item) for item in items if isinstance(item, list))
    return [{"model": model, "prompt": item} for item in items if isinstance(item, str)], known


def estimate_prompt_tokens(ctx: RequestContext) -> int:
    """The prompt's size at four bytes per token: what no tokenizer answered for."""
    requests, known = _tokenize_requests(ctx)
    text = sum(len(orjson.dumps(r.get("messages", r.get("prompt")))) for r in requests)
    return known + math.ceil(text / BYTES_PER_TOKEN)


async def _tokenize(data: EngineDataClient, ask: dict[str, Any], request_id: str) -> int:
    response = await data.post("/tokenize", orjson.dumps(ask), request_id)
    try:
        payload = await response.read()
    finally:
        response.release()
    if response.status != 200:
        raise RuntimeError(f"/tokenize answered {response.status}")
    return int(orjson.loads(payload)["count"])


async def count_prompt_tokens(ctx: RequestContext) -> tuple[int, UsageSource]:
    """The prompt's tokens and where the count came from ("tokenizer" or "estimate")."""
    replica = ctx.replica
    requests, known = _tokenize_requests(ctx)
    if replica is not None:
        try:
            counts = await asyncio.wait_for(
                asyncio.gather(*(_tokenize(replica.data, ask, ctx.request_id) for ask in requests)),
                TOKENIZE_TIMEOUT_S,
            )
            return known + sum(counts), "tokenizer"
        except Exception as error:  # noqa: BLE001  the engine is gone or has no tokenizer endpoint: estimate
            logger.info("cannot count the prompt's tokens with the engine's tokenizer; estimating",
                        extra={"request_id": ctx.request_id, "error": repr(error)})
    return estimate_prompt_tokens(ctx), "estimate"


async def complete_usage(ctx: RequestContext) -> None:
    """Give a request the client abandoned after it reached the engine its prompt tokens.

    Only then: a failure of the engine's or the worker's is not charged, and must not wait for an
    engine that may be gone before the stream ends.
    """
    if ctx.outcome != "client_disconnected" or ctx.replica is None:
        return
    usage = ctx.usage
    if usage is not None and usage.prompt_source != "none":
        return
    tokens, source = await count_prompt_tokens(ctx)
    if usage is None:
        usage = ctx.usage = Usage(completion_source="none")
    usage.prompt_tokens, usage.prompt_source = tokens, source
    ctx.usage_estimated = usage.estimated
