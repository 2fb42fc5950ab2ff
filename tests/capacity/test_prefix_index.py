"""Prefix indices and session affinity, pure: what a replica is estimated to hold for a prompt."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.datastructures import Headers

from worker.capacity.kv_index import KvEventsPrefixIndex, MockPromptTokenizer, token_links
from worker.capacity.prefix_index import (
    ApproximatePrefixIndex,
    PromptKey,
    SessionAffinity,
    build_prefix_index,
    chain_links,
    kv_capacity_tokens,
    prompt_text,
)
from worker.config import ModelConfig
from worker.engines.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from worker.gateway.requests import session_key

PRICING = {"prompt_per_mtok": "1", "completion_per_mtok": "2"}
SYSTEM = "You are a careful assistant who answers in full sentences. " * 40  # ~2.4k characters


def chat(*turns: str, system: str = SYSTEM) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for number, text in enumerate(turns):
        messages.append({"role": "user" if number % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def index(**capacities: int) -> ApproximatePrefixIndex:
    return ApproximatePrefixIndex(capacities or {"r0": 100_000, "r1": 100_000}, chunk_tokens=16, bytes_per_token=4)


# -- hash chains ---------------------------------------------------------------------------------


def test_chain_links_cover_full_chunks_and_each_link_depends_on_everything_before_it() -> None:
    links = chain_links(b"a" * 64 + b"b" * 64 + b"c" * 10, 64)
    assert len(links) == 2  # the partial chunk is never cached, so never linked
    assert chain_links(b"x" * 64 + b"b" * 64, 64)[1] != links[1]  # same chunk, different prefix
    assert chain_links(b"a" * 64 + b"b" * 64 + b"d" * 64, 64)[:2] == links


def test_chat_rendering_of_a_conversation_is_a_prefix_of_its_next_turn() -> None:
    first = prompt_text("chat.completions", chat("What is a river?"))
    second = prompt_text("chat.completions", chat("What is a river?", "Flowing water.", "And a lake?"))
    assert second.startswith(first)
    with_tools = chat("What is a river?") | {"tools": [{"type": "function", "function": {"name": "f"}}]}
    assert not prompt_text("chat.completions", with_tools).startswith(first)  # tools come first


def test_completion_and_embedding_prompts_render_their_first_prompt() -> None:
    assert prompt_text("completions", {"prompt": "hello world"}) == b"hello world"
    assert prompt_text("completions", {"prompt": ["first", "second"]}) == b"first"
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) == b"[1,2,3]"
    assert prompt_text("embeddings", {"input": "text"}) == b"text"
    assert prompt_text("chat.completions", {"messages": "not a list"}) == b""


# -- approximate index ---------------------------------------------------------------------------


def test_match_counts_the_leading_chunks_recorded_on_that_replica_only() -> None:
    prefixes = index()
    key = prefixes.keys("chat.completions", chat("What is a river?"))
    assert key.chunk_tokens == 16 and len(key.chain) > 30
    assert prefixes.match("r0", key) == 0
    prefixes.record("r0", key)
    assert prefixes.match("r0", key) == len(key.chain) * 16
    assert prefixes.match("r1", key) == 0
    assert prefixes.match("unknown", key) == 0


def test_a_later_turn_matches_the_history_its_session_sent_before() -> None:
    prefixes = index()
    turn1 = prefixes.keys("chat.completions", chat("What is a river?"))
    prefixes.record("r1", turn1)
    turn2 = prefixes.keys("chat.completions", chat("What is a river?", "Flowing water." * 20, "And a lake?"))
    matched = prefixes.match("r1", turn2)
    assert len(turn1.chain) * 16 - 16 <= matched <= len(turn1.chain) * 16  # all but a partial last chunk
    other_system = prefixes.keys("chat.completions", chat("What is a river?", system="Be brief. " * 300))
    assert prefixes.match("r1", other_system) == 0


def test_a_prefix_that_diverges_early_matches_only_up_to_the_divergence() -> None:
    prefixes = index()
    prefixes.record("r0", prefixes.keys("completions", {"prompt": "a" * 640 + "b" * 640}))
    assert prefixes.match("r0", prefixes.keys("completions", {"prompt": "a" * 640 + "c" * 640})) == 10 * 16
    assert prefixes.match("r0", prefixes.keys("completions", {"prompt": "c" + "a" * 640})) == 0


def test_the_lru_is_bounded_by_kv_capacity_and_evicts_tails_before_heads() -> None:
    prefixes = ApproximatePrefixIndex({"r0": 16 * 10}, chunk_tokens=16, bytes_per_token=1)  # 10 links
    old = prefixes.keys("completions", {"prompt": "o" * 16 * 8})
    prefixes.record("r0", old)
    new = prefixes.keys("completions", {"prompt": "n" * 16 * 4})
    prefixes.record("r0", new)
    assert prefixes.cached_links("r0") == 10
    assert prefixes.match("r0", new) == 4 * 16
    assert prefixes.match("r0", old) == 6 * 16  # its last two chunks went first; its head still matches


def test_recording_again_refreshes_a_prefix() -> None:
    prefixes = ApproximatePrefixIndex({"r0": 16 * 4}, chunk_tokens=16, bytes_per_token=1)
    a = prefixes.keys("completions", {"prompt": "a" * 32})
    b = prefixes.keys("completions", {"prompt": "b" * 32})
    c = prefixes.keys("completions", {"prompt": "c" * 32})
    prefixes.record("r0", a)
    prefixes.record("r0", b)
    prefixes.record("r0", a)  # a is now the most recent
    prefixes.record("r0", c)
    assert prefixes.match("r0", a) == 32 and prefixes.match("r0", c) == 32
    assert prefixes.match("r0", b) == 0


def test_forget_empties_a_restarted_replica_and_set_capacity_shrinks_it() -> None:
    prefixes = index()
    key = prefixes.keys("chat.completions", chat("hi"))
    prefixes.record("r0", key)
    prefixes.record("r1", key)
    prefixes.forget("r0")
    assert prefixes.match("r0", key) == 0 and prefixes.match("r1", key) > 0
    prefixes.set_capacity("r1", 32)
    assert prefixes.cached_links("r1") == 2
    with pytest.raises(KeyError, match="r9"):
        prefixes.record("r9", key)
    with pytest.raises(ValueError, match="r1"):
        prefixes.set_capacity("r1", 0)


def test_capacity_comes_from_the_mock_kv_blocks_or_the_batch_a_vllm_replica_must_hold() -> None:
    mock = ModelConfig.model_validate({"id": "m", "engine": "mock", "source": "mock://m", "pricing": PRICING,
                                       "engine_args": {"max_model_len": 256},
                                       "mock": {"num_kv_blocks": 100, "block_size": 16}})
    assert kv_capacity_tokens(mock) == 1600
    vllm = ModelConfig.model_validate({"id": "v", "engine": "vllm", "source": "org/model", "pricing": PRICING,
                                       "engine_args": {"max_model_len": 4096, "max_num_seqs": 8}})
    assert kv_capacity_tokens(vllm) == 8 * 4096


class FakeReplica:
    def __init__(self, replica_id: str, model: ModelConfig) -> None:
        self.replica_id = replica_id
        self.spec = type("Spec", (), {"model": model})()


def test_placement_builds_the_approximate_index_sized_from_each_replicas_kv_cache() -> None:
    model = ModelConfig.model_validate({"id": "m", "engine": "mock", "source": "mock://m", "pricing": PRICING,
                                        "engine_args": {"max_model_len": 256}, "mock": {"block_size": 4}})
    replicas: Any = [FakeReplica("m-0", model), FakeReplica("m-1", model)]
    approximate = build_prefix_index(replicas)
    assert isinstance(approximate, ApproximatePrefixIndex)
    key = approximate.keys("chat.completions", chat("x"))
    approximate.record("m-1", key)
    assert approximate.match("m-1", key) > 0 and approximate.match("m-0", key) == 0


# -- session affinity ----------------------------------------------------------------------------


def test_session_key_is_the_header_else_the_user_field() -> None:
    model = ModelConfig.model_validate({"id": "m", "engine": "mock", "source": "mock://m", "pricing": PRICING,
                                        "routing": {"session_header": "X-Session-Id"}})
    headers = Headers({"x-session-id": "s1"})
    assert session_key(model, headers, {"user": "u1"}) == "s1"
    assert session_key(model, Headers({}), {"user": "u1"}) == "u1"
    assert session_key(model, Headers({}), {"user": ""}) is None
    assert session_key(model, Headers({}), {"user": 42}) is None


def test_sessions_remember_their_last_replica_within_a_bound() -> None:
    sessions = SessionAffinity(max_sessions=2)
    sessions.remember("a", "r0")
    sessions.remember("b", "r1")
    assert sessions.replica_of("a") == "r0"  # touching "a" makes "b" the oldest
    sessions.remember("c", "r0")
    assert sessions.replica_of("b") is None and len(sessions) == 2
    sessions.remember("a", "r1")
    assert sessions.replica_of("a") == "r1"
    sessions.forget_replica("r1")
    assert sessions.replica_of("a") is None and sessions.replica_of("c") == "r0"


# -- exact index from KV events ------------------------------------------------------------------


def stored(hashes: list[int], parent: int | None, tokens: list[int], block_size: int = 4,
           **extra: Any) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=block_size,
                       lora_id=None, medium="GPU", lora_name=extra.pop("lora_name", None), **extra)


def batch(*events: Any) -> KvEventBatch:
    return KvEventBatch(ts=0.0, events=list(events), data_parallel_rank=0)


def completion_key(tokens: list[int], block_size: int = 4) -> PromptKey:
    return PromptKey(token_links(tokens, block_size), block_size)


def test_stored_blocks_are_matched_by_token_ids_whatever_the_engine_hashes() -> None:
    exact = KvEventsPrefixIndex(None, block_size=4)
    tokens = list(range(100, 112))
    exact.apply("r0", batch(stored([7, 8], None, tokens[:8]), stored([9], 8, tokens[8:12])))
    assert exact.cached_blocks("r0") == 3
    assert exact.match("r0", completion_key([*tokens, 5, 6])) == 12
    assert exact.match("r0", completion_key(tokens[:6])) == 4  # only full blocks count
    assert exact.match("r0", completion_key([1, *tokens])) == 0
    assert exact.match("r1", completion_key(tokens)) == 0


def test_removed_blocks_cut_the_match_where_the_first_one_was() -> None:
    exact = KvEventsPrefixIndex(None, block_size=4)
    tokens = list(range(12))
    exact.apply("r0", batch(stored([1, 2, 3], None, tokens)))
    exact.apply("r0", batch(BlockRemoved(block_hashes=[2], medium="GPU")))
    assert exact.match("r0", completion_key(tokens)) == 4
    exact.apply("r0", batch(AllBlocksCleared()))
    assert exact.match("r0", completion_key(tokens)) == 0 and exact.cached_blocks("r0") == 0


def test_blocks_a_plain_prompt_cannot_hit_are_not_indexed() -> None:
    exact = KvEventsPrefixIndex(None, block_size=4)
    exact.apply("r0", batch(
        stored([1], None, [1, 2, 3, 4], lora_name="adapter"),
        stored([2], None, [5, 6, 7, 8], extra_keys=[["salt"]]),
        stored([3], None, [9, 9], block_size=2),  # another block size
        stored([4], 999, [1, 1, 1, 1]),  # a parent from before we listened
    ))
    assert exact.cached_blocks("r0") == 0


def test_the_block_size_is_learned_from_the_first_event() -> None:
    exact = KvEventsPrefixIndex(None)
    exact.apply("r0", batch(stored([1, 2], None, list(range(16)), block_size=8)))
    assert exact.block_size == 8
    assert exact.match("r0", completion_key(list(range(20)), 8)) == 16
    assert exact.match("r0", completion_key(list(range(20)), 4)) == 0  # a key made for another size


def test_recorded_prefixes_count_until_the_engine_reports_them_and_forget_drops_both() -> None:
    exact = KvEventsPrefixIndex(MockPromptTokenizer(), block_size=4, pending_links=3)
    key = exact.keys("completions", {"prompt": "one two three four five six seven eight nine ten eleven twelve"})
    assert len(key.chain) == 3
    exact.record("r0", key)
    assert exact.match("r0", key) == 12
    exact.record("r0", exact.keys("completions", {"prompt": "alpha beta gamma delta"}))
    assert exact.match("r0", key) == 8  # the pending LRU holds 3 links: the oldest tail went first
    exact.forget("r0")
    assert exact.match("r0", key) == 0


def test_mock_tokenizer_gives_the_mock_engine_token_ids() -> None:
    from worker.engines.mock import tokens

    body = chat("What is a river?")
    assert MockPromptTokenizer().prompt_token_ids("chat.completions", body) == tokens.encode_chat(body["messages"])
    assert MockPromptTokenizer().prompt_token_ids("completions", {"prompt": [5, 6]}) == [5, 6]
    assert KvEventsPrefixIndex(None).keys("completions", {"prompt": "x"}).chain == ()


async def test_keys_async_gives_the_same_key_as_keys() -> None:
    body = chat("What is a river?")
    for prefixes in (index(), KvEventsPrefixIndex(MockPromptTokenizer(), block_size=4)):
        assert await prefixes.keys_async("chat.completions", body) == prefixes.keys("chat.completions", body)
