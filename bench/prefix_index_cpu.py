"""CPU per request of each prefix index: keys() + match() on every replica + record(), for a chat prompt.

    .venv/bin/python -m bench.prefix_index_cpu [--tokens 6000] [--replicas 4] [--model-dir DIR]

The exact index tokenizes with the model's tokenizer (`--model-dir`, a local model directory) or, without
one, the mock engine's toy tokenizer; its per-request cost is mostly that tokenizing. Each index is
measured warm (replicas already hold a shared system prompt, as in a multi-turn workload), on one core,
as the median of many runs; the numbers are microseconds of the calling thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from worker.capacity.kv_index import (
    HfPromptTokenizer,
    KvEventsPrefixIndex,
    MockPromptTokenizer,
    PromptTokenizer,
)
from worker.capacity.prefix_index import ApproximatePrefixIndex, PrefixIndex

WORDS = ("the", "river", "carries", "light", "and", "stone", "through", "the", "garden", "where", "people",
         "read", "paper", "signals", "about", "music", "and", "the", "engine", "queues", "every", "batch", "of",
         "tokens", "for", "the", "model")


def conversation(tokens: int, turn: int) -> dict[str, Any]:
    """~`tokens` tokens of chat: a long system prompt, then `turn` short exchanges (English: ~1.3 tokens a word)."""
    words = int(tokens / 1.3)
    system = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    messages = [{"role": "system", "content": system}]
    for number in range(turn):
        messages.append({"role": "user", "content": f"question {number}: what about the stone?"})
        messages.append({"role": "assistant", "content": f"answer {number}: it stays in the river."})
    messages.append({"role": "user", "content": "and the light?"})
    return {"model": "m", "messages": messages}


def per_request_us(index: PrefixIndex, replicas: list[str], bodies: list[dict[str, Any]], runs: int) -> float:
    samples = []
    for run in range(runs):
        body = bodies[run % len(bodies)]
        started = time.thread_time_ns()
        key = index.keys("chat.completions", body)
        for replica in replicas:
            index.match(replica, key)
        index.record(replicas[run % len(replicas)], key)
        samples.append(time.thread_time_ns() - started)
    return statistics.median(samples) / 1000


def measure(name: str, make: Callable[[], PrefixIndex], replicas: list[str], tokens: int, runs: int) -> None:
    index = make()
    bodies = [conversation(tokens, turn) for turn in range(8)]
    per_request_us(index, replicas, bodies, 50)  # warm: the replicas hold the prefixes
    keys_us = statistics.median(_time(lambda: index.keys("chat.completions", bodies[3])) for _ in range(runs))
    total_us = per_request_us(index, replicas, bodies, runs)
    print(f"{name:<38} keys {keys_us:8.0f} us   keys+match x{len(replicas)}+record {total_us:8.0f} us")


def _time(call: Callable[[], object]) -> float:
    started = time.thread_time_ns()
    call()
    return (time.thread_time_ns() - started) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--model-dir", help="a local model directory whose tokenizer the exact index uses")
    args = parser.parse_args()
    replicas = [f"r{i}" for i in range(args.replicas)]
    capacity = dict.fromkeys(replicas, 8192 * 16)
    print(f"{args.tokens}-token chat prompt, {args.replicas} replicas, median of {args.runs} runs")
    measure("approximate (64-token chunks)", lambda: ApproximatePrefixIndex(capacity), replicas, args.tokens,
            args.runs)
    tokenizers: list[tuple[str, PromptTokenizer]] = [("mock tokenizer", MockPromptTokenizer())]
    if args.model_dir:
        tokenizers.append((f"tokenizer of {args.model_dir}", HfPromptTokenizer(args.model_dir)))
    for label, tokenizer in tokenizers:
        measure(f"exact, {label}", lambda t=tokenizer: _exact(t, replicas, args.tokens), replicas, args.tokens,
                args.runs)


def _exact(tokenizer: PromptTokenizer, replicas: list[str], tokens: int) -> KvEventsPrefixIndex:
    """The exact index with every replica holding the prompt's blocks (as if its events had arrived)."""
    from worker.engines.kv_events import BlockStored, KvEventBatch

    index = KvEventsPrefixIndex(tokenizer, block_size=16)
    ids = tokenizer.prompt_token_ids("chat.completions", conversation(tokens, 0))
    usable = len(ids) // 16 * 16
    print(f"  ({len(ids)} tokens with this tokenizer)")
    event = BlockStored(block_hashes=list(range(usable // 16)), parent_block_hash=None, token_ids=ids[:usable],
                        block_size=16, lora_id=None, medium="GPU", lora_name=None)
    for replica in replicas:
        index.apply(replica, KvEventBatch(ts=0.0, events=[event]))
    return index


if __name__ == "__main__":
    main()
