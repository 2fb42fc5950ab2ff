"""The SSE relay and error mapping on their own, without any process."""

from __future__ import annotations

import orjson
import pytest

from worker.config import ModelConfig, Pricing
from worker.gateway.context import RequestContext
from worker.gateway.errors import normalise_engine_error
from worker.gateway.hooks import RequestHooks
from worker.gateway.pipeline import HookChain
from worker.gateway.relay import SseRelay


class RecordingHook:
    def __init__(self) -> None:
        self.finalized: list[RequestContext] = []

    async def before_request(self, ctx, request) -> None:
        return None

    def usage_extras(self, ctx: RequestContext) -> dict:
        return {"cost": 0.5}

    async def finalize(self, ctx: RequestContext) -> None:
        self.finalized.append(ctx)


def _ctx(wants_usage: bool, endpoint: str = "chat.completions") -> RequestContext:
    model = ModelConfig(id="m", engine="mock", source="x",
                        pricing=Pricing(prompt_per_mtok=1, completion_per_mtok=1))
    return RequestContext(request_id="r1", endpoint=endpoint, model=model, body={"n": 1}, stream=True,
                          client_wants_usage=wants_usage, headers={})


def _admitted_by(ctx: RequestContext, hooks: list[RequestHooks]) -> HookChain:
    """The request's hooks as the gateway leaves them once every one of them admitted it."""
    chain = HookChain(ctx, hooks)
    chain.passed = len(hooks)
    return chain


def _event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CONTENT = _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi \\\"usage\\\":{"},
                                          "finish_reason": None}]})
FINAL = _event({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
USAGE = _event({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                    "total_tokens": 5}})
DONE = b"data: [DONE]\n\n"


async def _run(relay: SseRelay, block: bytes) -> bytes:
    """What the relay's pump sends for one block: the block's events, then, at `[DONE]`, the finalizer and `[DONE]`."""
    out = relay.process(block)
    if relay.saw_done:
        await relay.finalizer()
        out += DONE
    return out


@pytest.mark.parametrize("wants_usage", [True, False])
async def test_usage_chunk_read_and_shown_only_when_asked(wants_usage: bool) -> None:
    hook = RecordingHook()
    ctx = _ctx(wants_usage)
    relay = SseRelay(ctx, _admitted_by(ctx, [hook]))
    out = await _run(relay, CONTENT + FINAL) + await _run(relay, USAGE + DONE)
    assert ctx.usage.prompt_tokens == 3 and ctx.usage.completion_tokens == 2
    assert ctx.finish_reason == "length"
    assert out.endswith(DONE)
    assert (b'"usage":{' in out) is wants_usage
    if wants_usage:
        usage_event = out.split(b"\n\n")[-3]
        assert orjson.loads(usage_event[6:])["usage"]["cost"] == 0.5
    assert hook.finalized == [ctx]
    assert relay.saw_done


async def test_content_that_mentions_usage_is_passed_untouched() -> None:
    ctx = _ctx(False)
    relay = SseRelay(ctx, _admitted_by(ctx, []))
    assert await _run(relay, CONTENT) == CONTENT
    assert ctx.usage is None


async def test_engine_error_event_becomes_router_error_chunk() -> None:
    ctx = _ctx(False, endpoint="completions")
    relay = SseRelay(ctx, _admitted_by(ctx, []))
    out = await _run(relay, _event({"error": {"message": "boom", "code": 500}}))
    chunk = orjson.loads(out[6:])
    assert chunk["choices"][0]["finish_reason"] == "error"
    assert chunk["object"] == "text_completion"
    assert chunk["error"]["message"] == "boom"
    assert ctx.outcome == "engine_error"


def test_estimated_usage_counts_streamed_events() -> None:
    ctx = _ctx(False)
    ctx.streamed_events = 5
    SseRelay(ctx, _admitted_by(ctx, [])).estimate_usage_if_missing()
    assert ctx.usage.completion_tokens == 4 and ctx.usage_estimated


def test_vllm_integer_code_is_normalised() -> None:
    body = orjson.dumps({"error": {"message": "This model's maximum context length is 512 tokens.",
                                   "type": "BadRequestError", "param": None, "code": 400}})
    error = orjson.loads(normalise_engine_error(400, body))["error"]
    assert error == {"message": "This model's maximum context length is 512 tokens.",
                     "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}


def test_fastapi_detail_and_garbage_bodies_are_normalised() -> None:
    assert orjson.loads(normalise_engine_error(404, b'{"detail": "Not Found"}'))["error"]["code"] == "not_found"
    error = orjson.loads(normalise_engine_error(500, b"<html>oops</html>"))["error"]
    assert error["code"] == "internal_error" and "oops" in error["message"]


def test_record_ids_are_unique_and_in_creation_order() -> None:
    ids = [_ctx(False).record_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
