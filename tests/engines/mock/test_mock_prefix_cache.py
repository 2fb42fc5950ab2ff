"""The mock engine caches prompt prefixes the way vLLM's v1 block pool does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.engines.mock.mock_engine_support import asgi_client, make_model, metric_value, sse_json
from tests.engines.mock.test_mock_scheduler import step
from worker.engines.kv_events import BlockRemoved, BlockStored, KvEvent
from worker.engines.mock.faults import FaultState
from worker.engines.mock.latency import LatencyModel
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.mock.scheduler import EngineLimits, Scheduler
from worker.engines.mock.sequence import Sequence
from worker.engines.mock.tokens import TokenSampler

BLOCK = 4


def make_scheduler(num_kv_blocks: int = 64, *, prefix_caching: bool = True, max_num_seqs: int = 8,
                   events: list[KvEvent] | None = None) -> Scheduler:
    limits = EngineLimits(max_num_seqs, 2048, 256, num_kv_blocks, BLOCK, prefix_caching)
    return Scheduler(limits, LatencyModel(0.0, 0.0, 0.001), EngineMetrics("m", BLOCK, num_kv_blocks, prefix_caching),
                     FaultState(), events.extend if events is not None else None)


def sequence(name: str, tokens: list[int], max_tokens: int = 2) -> Sequence:
    return Sequence(request_id=name, prompt_tokens=len(tokens), max_tokens=max_tokens,
                    sampler=TokenSampler(0, None, name, 0), stop=None, notify=asyncio.Event(), arrival=0.0,
                    token_ids=list(tokens))


def run(scheduler: Scheduler, *sequences: Sequence) -> list[int]:
    """Runs the sequences to the end; returns the prefill tokens of each step."""
    for seq in sequences:
        scheduler.add(seq)
    prefill = []
    while not all(seq.finished for seq in sequences):
        plan, prefill_tokens = scheduler.schedule(0.0)
        scheduler.complete(plan, 0.0)
        prefill.append(prefill_tokens)
    return prefill


PROMPT = list(range(1000, 1018))  # 18 tokens: 4 full blocks and 2 tokens


def test_a_repeated_prompt_computes_only_what_is_not_cached() -> None:
    scheduler = make_scheduler()
    first, second = sequence("a", PROMPT), sequence("b", PROMPT)
    assert run(scheduler, first)[0] == 18
    assert first.cached_tokens == 0 and first.created_cache_tokens == 16
    prefill = run(scheduler, second)
    assert second.cached_tokens == 16 and second.created_cache_tokens == 0
    assert prefill[0] == 2  # the step time charges prefill_per_token only for these
    assert scheduler._latency.step_seconds(1, prefill[0]) == pytest.approx(0.002)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    scheduler = make_scheduler()
    prompt = PROMPT[:16]
    run(scheduler, sequence("a", prompt))
    again = sequence("b", prompt)
    prefill = run(scheduler, again)
    assert again.cached_tokens == 12 and prefill[0] == 4  # the last block is recomputed, as in vLLM


def test_generated_tokens_are_cached_too_so_the_next_turn_hits_them() -> None:
    scheduler = make_scheduler()
    turn1 = sequence("a", PROMPT[:14], max_tokens=10)
    run(scheduler, turn1)
    history = turn1.token_ids  # prompt + reply, as the next turn's prompt starts
    turn2 = sequence("b", [*history, 7, 7, 7, 7])
    run(scheduler, turn2)
    assert turn2.cached_tokens == 20  # 23 computed tokens of turn 1 filled 5 blocks


def test_prefix_caching_off_caches_nothing() -> None:
    events: list[KvEvent] = []
    scheduler = make_scheduler(prefix_caching=False, events=events)
    run(scheduler, sequence("a", PROMPT))
    again = sequence("b", PROMPT)
    assert run(scheduler, again)[0] == 18 and again.cached_tokens == 0
    assert events == []


def test_eviction_takes_least_recently_freed_blocks_and_a_prefix_tail_first() -> None:
    events: list[KvEvent] = []
    scheduler = make_scheduler(num_kv_blocks=8, events=events)
    old = sequence("old", list(range(16)), max_tokens=1)  # 4 full blocks, then 1 more for its output
    run(scheduler, old)
    filler = sequence("filler", list(range(500, 518)), max_tokens=1)  # needs 5 blocks: evicts 1 of old's
    run(scheduler, filler)
    again = sequence("again", [*range(16), 1, 2], max_tokens=1)
    run(scheduler, again)
    assert again.cached_tokens == 12  # old's head survived; its last block was evicted first
    removed = [event for event in events if isinstance(event, BlockRemoved)]
    assert removed[0].block_hashes == [int.from_bytes(old.block_hashes[3], "big")]


def test_blocks_of_running_sequences_are_never_evicted() -> None:
    scheduler = make_scheduler(num_kv_blocks=6, max_num_seqs=2)
    running = sequence("running", list(range(16)), max_tokens=50)
    scheduler.add(running)
    step(scheduler)
    own = list(running.block_ids)
    newcomer = sequence("new", list(range(100, 112)), max_tokens=1)
    scheduler.add(newcomer)
    step(scheduler)
    assert running.block_ids[:len(own)] == own
    assert scheduler.blocks.free_blocks >= 0
    assert all(scheduler.blocks._hash_of[b] is not None for b in own)  # still named, still cached


def test_events_describe_stored_chains_and_evictions_like_vllm() -> None:
    events: list[KvEvent] = []
    scheduler = make_scheduler(num_kv_blocks=5, events=events)
    first = sequence("a", PROMPT[:12], max_tokens=1)
    run(scheduler, first)
    stored_events = [event for event in events if isinstance(event, BlockStored)]
    assert [len(e.block_hashes) for e in stored_events] == [3]
    assert stored_events[0].parent_block_hash is None
    assert stored_events[0].token_ids == PROMPT[:12] and stored_events[0].block_size == BLOCK
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in stored_events[0].block_hashes)
    events.clear()
    second = sequence("b", [*PROMPT[:12], 5, 5, 5, 5, 5], max_tokens=1)
    run(scheduler, second)
    later = [event for event in events if isinstance(event, BlockStored)]
    # Its fourth block continues the chain of the cached three; making room for it evicted the oldest free
    # block (the 5-block cache held a's 3 blocks and its output block).
    assert later[0].parent_block_hash == stored_events[0].block_hashes[-1]
    assert later[0].token_ids == [5, 5, 5, 5]


# -- through the HTTP app ------------------------------------------------------------------------


def long_chat(question: str, **extra: Any) -> dict[str, Any]:
    system = "You answer questions about rivers and stones and light. " * 20
    return {"model": "mock-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}], **extra}


async def test_usage_reports_cached_tokens_and_metrics_count_them() -> None:
    model = make_model(enable_prompt_tokens_details=True)
    async with asgi_client(model) as (client, _):
        first = (await client.post("/v1/chat/completions", json=long_chat("What is a river?"))).json()
        second = (await client.post("/v1/chat/completions", json=long_chat("And a stone?"))).json()
        streamed = sse_json((await client.post("/v1/chat/completions", json=long_chat(
            "And light?", stream=True, stream_options={"include_usage": True}))).text)
        completion = (await client.post("/v1/completions", json={
            "model": "mock-model", "prompt": "rivers and stones " * 20, "max_tokens": 2})).json()
        metrics = (await client.get("/metrics")).text
    details = first["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": 0, "created_cache_tokens": details["created_cache_tokens"],
                       "multimodal_tokens": None}
    assert details["created_cache_tokens"] == first["usage"]["prompt_tokens"] // 16 * 16
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.8 * second["usage"]["prompt_tokens"] and cached % 16 == 0
    assert streamed[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached
    assert completion["usage"]["prompt_tokens_details"]["created_cache_tokens"] is None
    prompts = sum(r["usage"]["prompt_tokens"] for r in (first, second, completion)) \
        + streamed[-1]["usage"]["prompt_tokens"]
    assert metric_value(metrics, "vllm:prefix_cache_queries_total") == prompts
    hits = cached + streamed[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] \
        + completion["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert metric_value(metrics, "vllm:prefix_cache_hits_total") == hits
    assert metric_value(metrics, "vllm:cache_config_info", enable_prefix_caching="True") == 1


async def test_without_prompt_tokens_details_usage_has_none_as_vllm_by_default() -> None:
    async with asgi_client(make_model()) as (client, _):
        await client.post("/v1/chat/completions", json=long_chat("What is a river?"))
        second = (await client.post("/v1/chat/completions", json=long_chat("What is a river?"))).json()
        metrics = (await client.get("/metrics")).text
    assert second["usage"]["prompt_tokens_details"] is None
    assert metric_value(metrics, "vllm:prefix_cache_hits_total") > 0


async def test_a_shared_prefix_makes_the_second_request_faster() -> None:
    # 2 ms of prefill per token: the ~220-token prompt takes ~0.45 s uncached, a few steps cached.
    model = make_model(prefill_per_token_ms=2.0, step_base_ms=1.0, enable_prompt_tokens_details=True)
    async with asgi_client(model) as (client, app):
        await client.post("/v1/chat/completions", json=long_chat("What is a river?"))
        cached = (await client.post("/v1/chat/completions", json=long_chat("What is a stone?"))).json()
        metrics = app.state.engine.metrics.render().decode()
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 200
    # TTFT histogram: one request over 0.25 s (the uncached one), one under it.
    assert metric_value(metrics, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 1
    assert metric_value(metrics, "vllm:time_to_first_token_seconds_count") == 2
