"""Scheduler benchmark: how the worker's placement policies use the replicas' prefix caches, and GuideLLM's
throughput profile straight at an engine and through the worker.

    .venv/bin/python -m bench.scheduler [--quick] [--skip-guidellm] [--doc docs/benchmarks-scheduler.md]

Part 1 (mock engine, 4 replicas, a prefill cost per uncached prompt token): the placement policies
round_robin, least_loaded and cache_aware (by the approximate prefix index) side by side in one run, one
`worker serve` per policy, each measured on the same three phases:

- *saturation*: closed loop, more chat users than the replicas have batch slots, each user running
  multi-turn sessions (a tenant's long system prompt, shared by all that tenant's sessions, plus a growing
  history) one turn after another;
- *0.8x*: open loop, sessions arriving as a Poisson process so that turns arrive at 0.8x the completed
  turns/s that least_loaded reached at saturation (least_loaded runs first);
- *no shared prefix*: closed loop again, every request a single turn with a prompt of its own.

Each phase reports output tok/s, TTFT p50/p90/p99, the engines' prefix-cache hit rate (growth of
`vllm:prefix_cache_hits` over `vllm:prefix_cache_queries`, summed over the replicas), refusals, and the
worker process's CPU time per request (psutil; the engines' processes are not counted).

The multi-turn driver is our own: `vllm bench serve` has shared-prefix datasets but no sessions whose
history grows turn by turn. It is an aiohttp client (HTTP parsed in C); the load generator, the worker and
the engines share this machine's cores, so compare the policies' rows with each other.

Part 2 (GuideLLM 0.8.1, the throughput profile): 300 requests of 128 prompt / 64 output tokens at up to 128
concurrent, a mock model with 32 batch slots, straight at the engine, through the worker with a first-token
objective that covers the engine's own wait, and through the worker with the default objective.

The exact prefix index is not a placement option and is not measured: see `EXACT_NOT_MEASURED`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import numpy as np
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.arrivals import poisson_arrivals
from bench.common import command_line, describe_machine, fmt, table_head
from tests.support.worker_process import WorkerProcess, start_worker

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench/scheduler"
GUIDELLM_MODEL = "bench/guidellm"
START_TIMEOUT_S = 120.0

# models.yaml (`routing:`, `admission:`) per policy, in the order they run (least_loaded first: 0.8x is of
# its capacity). The last lets each replica hold a queue of its own (`queue_allowance`): with the queue in
# the worker only, a saturated model has one replica with room at a time, so placement has no choice.
ALLOWANCE = 8
POLICIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "least_loaded": ({"policy": "least_loaded"}, {}),
    "round_robin": ({"policy": "round_robin"}, {}),
    "cache_aware": ({"policy": "cache_aware"}, {}),
    f"cache_aware, queue_allowance {ALLOWANCE}": ({"policy": "cache_aware"}, {"queue_allowance": ALLOWANCE}),
}
CACHE_AWARE, LEAST_LOADED = "cache_aware", "least_loaded"
CACHE_AWARE_ALLOWANCE = f"cache_aware, queue_allowance {ALLOWANCE}"

EXACT_NOT_MEASURED = (
    "cache_aware places by the approximate prefix index (the prefixes, hashed in chunks of the request's text, "
    "that the worker sent to each replica). The exact index fed by the engines' KV-cache events "
    "(worker/capacity/kv_index.py) is not a placement option, so it is not in this run: tokenizing a prompt "
    "for it costs 3.5-15 ms per request against ~0.15 ms for the approximate index "
    "(`bench/prefix_index_cpu.py`), more than the worker spends on a whole request."
)
VLLM_PART = ("The vLLM-CPU part (2 replicas of an enlarged tiny model) runs separately, as it takes a few "
             "minutes per policy to start the engines: `bench.scheduler_vllm`, page "
             "[benchmarks-scheduler-vllm.md](benchmarks-scheduler-vllm.md).")

WORDS = ("the", "river", "carries", "light", "and", "stone", "through", "garden", "where", "people", "read",
         "paper", "signal", "music", "engine", "queue", "batch", "token", "model", "window", "years", "good",
         "back", "way", "first", "many", "other", "time", "people", "water", "north", "market", "letter")


@dataclass(frozen=True)
class MockSetup:
    """The engine of part 1: small batches, a prefill cost per uncached token, a KV cache that holds about a
    quarter of all tenants' prompts (so where a session lands decides whether its prefix is cached)."""

    replicas: int = 4
    max_num_seqs: int = 8
    step_base_ms: float = 20.0
    step_per_seq_ms: float = 0.5
    prefill_per_token_ms: float = 0.1
    num_kv_blocks: int = 1536
    block_size: int = 16
    max_num_batched_tokens: int = 4096
    max_model_len: int = 4096


@dataclass(frozen=True)
class Workload:
    tenants: int = 48
    system_words: int = 1500
    turns: int = 6
    user_words: int = 20
    output_tokens: int = 32
    users: int = 48  # closed-loop users: more than the replicas' batch slots (4 x 8)
    duration_s: float = 20.0
    warmup_s: float = 5.0  # left out of every phase's figures
    pause_s: float = 1.0  # between phases, for the engines to empty


QUICK_SETUP = MockSetup(num_kv_blocks=512, step_base_ms=5.0)
QUICK_WORKLOAD = Workload(tenants=8, system_words=300, turns=3, users=8, output_tokens=8, duration_s=2.0,
                          warmup_s=0.5, pause_s=0.2)


# -- the workload -----------------------------------------------------------------------------------


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


@dataclass(frozen=True)
class Tenants:
    """Each tenant's long system prompt, shared by every session of that tenant."""

    prompts: tuple[str, ...]

    @classmethod
    def make(cls, workload: Workload, seed: int = 0) -> Tenants:
        rng = random.Random(seed)
        return cls(tuple(f"tenant {t} instructions: {words(rng, workload.system_words)}"
                         for t in range(workload.tenants)))


@dataclass
class Session:
    system: str
    rng: random.Random
    messages: list[dict[str, str]] = field(default_factory=list)

    def next_body(self, workload: Workload) -> dict[str, Any]:
        if not self.messages:
            self.messages.append({"role": "system", "content": self.system})
        self.messages.append({"role": "user", "content": words(self.rng, workload.user_words)})
        return chat_body(list(self.messages), workload.output_tokens)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def chat_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


@dataclass
class Outcome:
    status: int  # 0: the connection failed
    started: float
    finished: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    text: str = ""


async def one_turn(client: aiohttp.ClientSession, body: dict[str, Any]) -> Outcome:
    """One streamed chat completion; TTFT is vLLM's (to the first event carrying `choices`)."""
    outcome = Outcome(0, time.perf_counter())
    pieces: list[str] = []
    try:
        async with client.post("/v1/chat/completions", data=orjson.dumps(body),
                               headers={"content-type": "application/json"}) as response:
            outcome.status = response.status
            if response.status != 200:
                await response.read()
            else:
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue  # separators, keep-alive comments, [DONE]
                    event = orjson.loads(line[6:])
                    if event.get("choices"):
                        if outcome.ttft_s is None:
                            outcome.ttft_s = time.perf_counter() - outcome.started
                        pieces.append(event["choices"][0].get("delta", {}).get("content") or "")
                    if event.get("usage"):
                        outcome.output_tokens = int(event["usage"]["completion_tokens"])
    except aiohttp.ClientError:
        outcome.status = 0
    outcome.finished = time.perf_counter()
    outcome.text = "".join(pieces)
    return outcome


async def run_session(client: aiohttp.ClientSession, session: Session, workload: Workload, deadline: float,
                      outcomes: list[Outcome]) -> None:
    for _ in range(workload.turns):
        if time.perf_counter() >= deadline:
            return
        outcome = await one_turn(client, session.next_body(workload))
        outcomes.append(outcome)
        if outcome.status != 200:
            return  # a refused turn ends its session, as a client would give up or go elsewhere
        session.answered(outcome.text)


async def closed_loop_sessions(client: aiohttp.ClientSession, tenants: Tenants, workload: Workload,
                               seed: int) -> tuple[list[Outcome], float]:
    started = time.perf_counter()
    deadline = started + workload.duration_s
    outcomes: list[Outcome] = []

    async def user(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while time.perf_counter() < deadline:
            session = Session(rng.choice(tenants.prompts), random.Random(rng.random()))
            await run_session(client, session, workload, deadline, outcomes)

    await asyncio.gather(*(user(n) for n in range(workload.users)))
    return outcomes, started


async def open_loop_sessions(client: aiohttp.ClientSession, tenants: Tenants, workload: Workload,
                             turns_per_s: float, seed: int) -> tuple[list[Outcome], float]:
    """Sessions arrive as a Poisson process; each runs its turns one after another."""
    rng = random.Random(seed)
    started = time.perf_counter()
    deadline = started + workload.duration_s
    outcomes: list[Outcome] = []
    tasks = []
    for at in poisson_arrivals(turns_per_s / workload.turns, workload.duration_s, seed):
        delay = started + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        session = Session(rng.choice(tenants.prompts), random.Random(rng.random()))
        tasks.append(asyncio.create_task(run_session(client, session, workload, deadline, outcomes)))
    await asyncio.gather(*tasks)
    return outcomes, started


async def closed_loop_unique(client: aiohttp.ClientSession, workload: Workload,
                             seed: int) -> tuple[list[Outcome], float]:
    """Single turns whose prompts share nothing: a prompt of the same length as a session's first turn."""
    started = time.perf_counter()
    deadline = started + workload.duration_s
    outcomes: list[Outcome] = []

    async def user(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        count = 0
        while time.perf_counter() < deadline:
            count += 1
            system = f"request {number}-{count}: {words(rng, workload.system_words)}"
            body = chat_body([{"role": "system", "content": system},
                              {"role": "user", "content": words(rng, workload.user_words)}], workload.output_tokens)
            outcomes.append(await one_turn(client, body))

    await asyncio.gather(*(user(n) for n in range(workload.users)))
    return outcomes, started


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Phase:
    policy: str
    name: str
    outcomes: list[Outcome]
    started: float
    workload: Workload
    prefix_queries: float
    prefix_hits: float
    cpu_s: float
    offered_turns_per_s: float | None = None

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def window(self) -> tuple[float, float]:
        return self.started + self.workload.warmup_s, self.started + self.workload.duration_s

    def _in_window(self) -> list[Outcome]:
        low, high = self.window
        return [o for o in self.outcomes if low <= o.started <= high]

    @property
    def output_tok_s(self) -> float:
        low, high = self.window
        tokens = sum(o.output_tokens for o in self.outcomes if o.status == 200 and low <= o.finished <= high)
        return tokens / (high - low)

    @property
    def turns_per_s(self) -> float:
        low, high = self.window
        return sum(1 for o in self.outcomes if o.status == 200 and low <= o.finished <= high) / (high - low)

    def ttft_ms(self, q: float) -> float:
        values = [o.ttft_s * 1000 for o in self._in_window() if o.status == 200 and o.ttft_s is not None]
        return float(np.percentile(values, q)) if values else float("nan")

    @property
    def refused(self) -> int:
        return sum(1 for o in self.outcomes if o.status in (429, 503))

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status not in (200, 429, 503))

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / len(self.outcomes) if self.outcomes else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"policy": self.policy, "phase": self.name, "requests": len(self.outcomes),
                "output_tok_s": self.output_tok_s, "turns_per_s": self.turns_per_s,
                "ttft_p50_ms": self.ttft_ms(50), "ttft_p90_ms": self.ttft_ms(90), "ttft_p99_ms": self.ttft_ms(99),
                "prefix_cache_hit_rate": self.hit_rate, "refused": self.refused, "failed": self.failed,
                "worker_cpu_ms_per_request": self.cpu_ms_per_request,
                "offered_turns_per_s": self.offered_turns_per_s}


async def prefix_counters(client: aiohttp.ClientSession, ports: list[int]) -> tuple[float, float]:
    """(queries, hits) of the replicas' prefix caches, summed."""
    queries = hits = 0.0
    for port in ports:
        async with client.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:prefix_cache_queries_total":
                    queries += sample.value
                elif sample.name == "vllm:prefix_cache_hits_total":
                    hits += sample.value
    return queries, hits


def worker_cpu_s(worker: WorkerProcess) -> float:
    """CPU time of the worker process and its gateway processes (if any), not of its engines."""
    processes = [psutil.Process(worker.process.pid), *worker.gateway_processes()]
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def mock_model(setup: MockSetup, routing: dict[str, Any], admission: dict[str, Any] | None = None,
               model_id: str = MODEL, replicas: int | None = None, **mock: Any) -> dict[str, Any]:
    return {
        "id": model_id, "engine": "mock", "source": f"local/{model_id}",
        "replicas": setup.replicas if replicas is None else replicas,
        "engine_args": {"max_model_len": setup.max_model_len, "max_num_seqs": setup.max_num_seqs,
                        "max_num_batched_tokens": setup.max_num_batched_tokens},
        "pricing": {"prompt_per_mtok": "0", "completion_per_mtok": "0"},
        "routing": routing,
        **({"admission": admission} if admission else {}),
        "mock": {"step_base_ms": setup.step_base_ms, "step_per_seq_ms": setup.step_per_seq_ms,
                 "prefill_per_token_ms": setup.prefill_per_token_ms, "num_kv_blocks": setup.num_kv_blocks,
                 "block_size": setup.block_size, **mock},
    }


@contextlib.asynccontextmanager
async def serving(work_dir: Path, model: dict[str, Any], *, engine: str = "mock",
                  start_timeout_s: float = START_TIMEOUT_S,
                  worker_settings: dict[str, Any] | None = None) -> AsyncIterator[WorkerProcess]:
    """`worker serve` with one model, auth and the ledger off (the load carries no key)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config = {"worker": {"id": "scheduler-bench", **(worker_settings or {})}, "models": [model]}
    worker = start_worker(work_dir, config, engine=engine,
                          env={"WORKER_AUTH": "false", "WORKER_LEDGER": "false", "WORKER_LOG_LEVEL": "warning"})
    try:
        await asyncio.to_thread(worker.wait_ready, start_timeout_s)
        await every_replica_answers(worker, model["id"], model["replicas"], start_timeout_s)
        yield worker
    finally:
        await asyncio.to_thread(worker.stop)


async def every_replica_answers(worker: WorkerProcess, model_id: str, replicas: int,
                                timeout_s: float = START_TIMEOUT_S) -> None:
    """The worker is ready once one replica is; the load waits for all of them."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
        while time.monotonic() < deadline:
            ports = worker.engine_ports(model_id)
            answering = 0
            for port in ports:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(f"http://127.0.0.1:{port}/health") as response:
                        answering += response.status == 200
            if len(ports) == replicas and answering == replicas:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{model_id}: not every one of {replicas} replicas answered; see {worker.log_path}")


async def measure_phase(client: aiohttp.ClientSession, worker: WorkerProcess, policy: str, name: str,
                        workload: Workload, load: Any, offered: float | None = None) -> Phase:
    ports = worker.engine_ports(MODEL)
    queries, hits = await prefix_counters(client, ports)
    cpu = worker_cpu_s(worker)
    outcomes, started = await load
    queries_after, hits_after = await prefix_counters(client, ports)
    phase = Phase(policy, name, outcomes, started, workload, queries_after - queries, hits_after - hits,
                  worker_cpu_s(worker) - cpu, offered)
    print(f"{policy:<26} {name:<16} {phase.output_tok_s:8.0f} tok/s  TTFT p90 {phase.ttft_ms(90):8.0f} ms  "
          f"hit rate {phase.hit_rate:.2f}  refused {phase.refused}  failed {phase.failed}", flush=True)
    return phase


async def measure_policy(client: aiohttp.ClientSession, worker: WorkerProcess, policy: str, tenants: Tenants,
                         workload: Workload, capacity_turns_s: float) -> list[Phase]:
    """The three phases on one worker: saturation, 0.8x of `capacity_turns_s` (least_loaded's turns/s at
    saturation; its own when `policy` is least_loaded), no shared prefix."""
    saturation = await measure_phase(client, worker, policy, "saturation", workload,
                                     closed_loop_sessions(client, tenants, workload, seed=1))
    offered = 0.8 * (saturation.turns_per_s if policy == LEAST_LOADED else capacity_turns_s)
    await asyncio.sleep(workload.pause_s)
    paced = await measure_phase(client, worker, policy, "0.8x", workload,
                                open_loop_sessions(client, tenants, workload, offered, seed=2), offered)
    await asyncio.sleep(workload.pause_s)
    unique = await measure_phase(client, worker, policy, "no shared prefix", workload,
                                 closed_loop_unique(client, workload, seed=3))
    return [saturation, paced, unique]


async def policy_runs(setup: MockSetup, workload: Workload, work_dir: Path,
                      policies: list[str] | None = None) -> list[Phase]:
    tenants = Tenants.make(workload)
    phases: list[Phase] = []
    capacity_turns_s = 0.0
    timeout = aiohttp.ClientTimeout(total=600)
    chosen = {name: POLICIES[name] for name in POLICIES if policies is None or name in policies}
    for number, (policy, (routing, admission)) in enumerate(chosen.items()):
        async with serving(work_dir / f"policy-{number}", mock_model(setup, routing, admission)) as worker, \
                aiohttp.ClientSession(worker.base_url, timeout=timeout,
                                      connector=aiohttp.TCPConnector(limit=0)) as client:
            policy_phases = await measure_policy(client, worker, policy, tenants, workload, capacity_turns_s)
            if policy == LEAST_LOADED:
                capacity_turns_s = policy_phases[0].turns_per_s
            phases += policy_phases
    return phases


# -- GuideLLM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuideLlmShape:
    requests: int = 300
    prompt_tokens: int = 128
    output_tokens: int = 64
    max_concurrency: int = 128
    batch_slots: int = 32


QUICK_GUIDELLM = GuideLlmShape(requests=24, output_tokens=16, max_concurrency=16, batch_slots=4)
LONG_OBJECTIVE_S = 120.0


@dataclass
class GuideLlmRun:
    path: str
    successful: int
    errored: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    refusals: dict[str, int] = field(default_factory=dict)


def guidellm(target: str, shape: GuideLlmShape, tokenizer_dir: Path, work_dir: Path, label: str) -> dict[str, Any]:
    report = work_dir / f"guidellm-{label}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work_dir / "hf")}
    command = [
        sys.executable, "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={target},model={GUIDELLM_MODEL}",
        "--profile", f"kind=throughput,max_concurrency={shape.max_concurrency}",
        "--constraint", f"kind=max_requests,count={shape.requests}",
        "--data", f"kind=synthetic_text,prompt_tokens={shape.prompt_tokens},output_tokens={shape.output_tokens}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    with (work_dir / f"guidellm-{label}.log").open("w") as log:
        subprocess.run(command, env=env, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, check=True,
                       timeout=600)
    [benchmark] = orjson.loads(report.read_bytes())["benchmarks"]
    return benchmark


def read_guidellm(path: str, benchmark: dict[str, Any]) -> GuideLlmRun:
    state = benchmark["scheduler_state"]
    metrics = benchmark["metrics"]
    ttft = metrics["time_to_first_token_ms"]["successful"]
    return GuideLlmRun(path, int(state["successful_requests"]), int(state["errored_requests"]),
                       float(metrics["output_tokens_per_second"]["successful"]["mean"]),
                       float(ttft["median"]), float(ttft["percentiles"]["p99"]))


async def refusals_by_reason(base_url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as client, client.get(f"{base_url}/metrics") as response:
        text = await response.text()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "worker_admission_rejections_total" and sample.value:
                counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0) + int(sample.value)
    return counts


async def guidellm_runs(shape: GuideLlmShape, work_dir: Path) -> list[GuideLlmRun]:
    from tests.fixtures.tiny_model import make_tiny_model

    tokenizer_dir = await asyncio.to_thread(make_tiny_model, work_dir / "tokenizer")
    # The mock's default step costs (8 ms + 0.15 ms per running sequence), one replica of `batch_slots`.
    setup = MockSetup(replicas=1, max_num_seqs=shape.batch_slots, step_base_ms=8.0, step_per_seq_ms=0.15,
                      prefill_per_token_ms=0.01, num_kv_blocks=8192, max_num_batched_tokens=8192,
                      max_model_len=2048)
    runs: list[GuideLlmRun] = []
    for label, admission in (("long objective", {"ttft_objective_s": LONG_OBJECTIVE_S}), ("default objective", {})):
        model = mock_model(setup, {"policy": "cache_aware"}, admission, model_id=GUIDELLM_MODEL)
        async with serving(work_dir / f"guidellm-{label.replace(' ', '-')}", model) as worker:
            if not runs:
                (port,) = worker.engine_ports(GUIDELLM_MODEL)
                direct = await asyncio.to_thread(guidellm, f"http://127.0.0.1:{port}", shape, tokenizer_dir,
                                                 work_dir, "direct")
                runs.append(read_guidellm("straight at the engine", direct))
            through = await asyncio.to_thread(guidellm, worker.base_url, shape, tokenizer_dir, work_dir,
                                              label.replace(" ", "-"))
            run = read_guidellm(f"through the worker, {label}", through)
            run.refusals = await refusals_by_reason(worker.base_url)
            runs.append(run)
        print(f"guidellm {runs[-1].path}: {runs[-1].successful} ok, {runs[-1].errored} errors, "
              f"{runs[-1].output_tok_s:.0f} tok/s", flush=True)
    return runs


# -- the page ---------------------------------------------------------------------------------------


class PhaseRow(Protocol):
    """What the results table and the plot read of a phase (a measured `Phase`, or figures read back)."""

    @property
    def policy(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def requests(self) -> int: ...
    @property
    def output_tok_s(self) -> float: ...
    @property
    def turns_per_s(self) -> float: ...
    @property
    def hit_rate(self) -> float: ...
    @property
    def refused(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def cpu_ms_per_request(self) -> float: ...
    def ttft_ms(self, q: int) -> float: ...


Row = TypeVar("Row", bound=PhaseRow)


def results_table(phases: Sequence[PhaseRow]) -> list[str]:
    lines = table_head("| policy | phase | requests | output tok/s | turns/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
                       "| prefix-cache hit rate | refused | failed | worker CPU ms/request |")
    for p in phases:
        lines.append(f"| {p.policy} | {p.name} | {p.requests} | {fmt(p.output_tok_s)} | {fmt(p.turns_per_s, 1)} "
                     f"| {fmt(p.ttft_ms(50))} | {fmt(p.ttft_ms(90))} | {fmt(p.ttft_ms(99))} | {fmt(p.hit_rate, 2)} "
                     f"| {p.refused} | {p.failed} | {fmt(p.cpu_ms_per_request, 2)} |")
    return lines


def by(phases: Sequence[Row], policy: str, name: str) -> Row:
    return next(p for p in phases if p.policy == policy and p.name == name)


def goal_lines(phases: list[Phase], cache_policy: str = CACHE_AWARE) -> list[str]:
    cache, load = by(phases, cache_policy, "saturation"), by(phases, LEAST_LOADED, "saturation")
    tok_ratio = cache.output_tok_s / load.output_tok_s if load.output_tok_s else float("nan")
    paced_cache, paced_load = by(phases, cache_policy, "0.8x"), by(phases, LEAST_LOADED, "0.8x")
    ttft_ratio = paced_load.ttft_ms(90) / paced_cache.ttft_ms(90)
    unique_cache, unique_load = by(phases, cache_policy, "no shared prefix"), by(phases, LEAST_LOADED,
                                                                                   "no shared prefix")
    unique_ratio = unique_cache.output_tok_s / unique_load.output_tok_s if unique_load.output_tok_s else float("nan")

    def verdict(met: bool) -> str:
        return "**met**" if met else "**missed**"

    return [
        (f"- `{cache_policy}` vs least_loaded, output tok/s at saturation: {fmt(cache.output_tok_s)} vs "
        f"{fmt(load.output_tok_s)}, **{tok_ratio:.2f}x** (goal >= 1.5x: {verdict(tok_ratio >= 1.5)})."),
        (f"- `{cache_policy}`, p90 TTFT at 0.8x of least_loaded's capacity ({fmt(paced_load.offered_turns_per_s or 0, 1)} turns/s "
        f"offered): least_loaded {fmt(paced_load.ttft_ms(90))} ms vs {fmt(paced_cache.ttft_ms(90))} ms, "
        f"**{ttft_ratio:.1f}x lower** (goal >= 5x: {verdict(ttft_ratio >= 5)})."),
        (f"- `{cache_policy}`, no shared prefixes: {fmt(unique_cache.output_tok_s)} vs least_loaded "
        f"{fmt(unique_load.output_tok_s)} output tok/s, **{unique_ratio:.3f}x** (goal: no worse than 3% below: "
        f"{verdict(unique_ratio >= 0.97)})."),
    ]


def policies_in(phases: Sequence[PhaseRow]) -> list[str]:
    return list(dict.fromkeys(p.policy for p in phases))


def reading_lines(phases: list[Phase]) -> list[str]:
    """Why the policies differ where they do: the figures come from this run."""
    present = policies_in(phases)
    if CACHE_AWARE not in present:
        return []
    cache, load = by(phases, CACHE_AWARE, "saturation"), by(phases, LEAST_LOADED, "saturation")
    paced, paced_load = by(phases, CACHE_AWARE, "0.8x"), by(phases, LEAST_LOADED, "0.8x")
    lines = [
        "## Reading the results", "",
        ("The worker binds a queued request when a replica has a free batch slot (late binding). At saturation "
         "slots free up one at a time; least_loaded gives each to the head of the queue, wherever its prefix is "
         f"cached (hit rate {fmt(load.hit_rate, 2)}). cache_aware gives a freed slot to the first request in "
         "turn order, within a lookahead of 4 per replica, whose prefix that replica holds (or that no replica "
         "holds); a request passed over waits for the replica that holds its prefix and gets that replica's "
         "next free slot, and is passed over a bounded number of times (hit rate "
         f"{fmt(cache.hit_rate, 2)}). Below saturation a request whose prefix sits on a full replica waits for "
         "that replica up to one slot interval (the time a request holds a slot over the replica's slots) "
         f"before it goes elsewhere (hit rate {fmt(paced.hit_rate, 2)} against {fmt(paced_load.hit_rate, 2)})."),
    ]
    if CACHE_AWARE_ALLOWANCE in present:
        allowance = by(phases, CACHE_AWARE_ALLOWANCE, "saturation")
        lines += ["", (f"With `queue_allowance: {ALLOWANCE}` every replica also has room beyond its batch, so "
                       "a request is placed on the replica that holds its prefix and waits in that engine's "
                       f"queue instead of the worker's (hit rate {fmt(allowance.hit_rate, 2)} at saturation), "
                       "where the fair queue and the first-token objective no longer see it.")]
    paced_floor = paced.ttft_ms(50)
    lines += ["", ("The 0.8x p90 ratio is bounded by the engine's own first-token time: a fully cached turn still "
                   "waits for the engine's next step and one prefill step (p50 "
                   f"{fmt(paced_floor)} ms for cache_aware here), so no placement can take p90 below about that; "
                   f"least_loaded's p90 of {fmt(paced_load.ttft_ms(90))} ms is "
                   f"{paced_load.ttft_ms(90) / paced_floor:.1f}x that floor.")]
    return lines


def guidellm_lines(runs: list[GuideLlmRun], shape: GuideLlmShape) -> list[str]:
    direct = runs[0]
    lines = [
        "## GuideLLM's throughput profile", "",
        (f"GuideLLM {guidellm_version()}, `--profile kind=throughput,max_concurrency={shape.max_concurrency}`, "
        f"{shape.requests} requests of {shape.prompt_tokens} prompt / {shape.output_tokens} output tokens "
        "(synthetic text, counted with a local tokenizer, the hub offline), streaming chat completions. One "
        f"replica of the mock engine with {shape.batch_slots} batch slots (`max_num_seqs`) and its default step "
        f"costs. `long objective` sets `admission: {{ttft_objective_s: {LONG_OBJECTIVE_S:g}}}`, which covers "
        "the wait the engine itself imposes on a burst of this size; `default objective` is the model's default "
        "(10 s). Output tok/s and TTFT are GuideLLM's own figures for successful requests."), "",
        *table_head("| path | successful | errored | output tok/s | of direct | TTFT p50 ms | TTFT p99 ms "
                    "| refusals by reason |"),
    ]
    for run in runs:
        share = run.output_tok_s / direct.output_tok_s if direct.output_tok_s else float("nan")
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(run.refusals.items())) or "-"
        lines.append(f"| {run.path} | {run.successful} | {run.errored} | {fmt(run.output_tok_s)} | {share:.2f} "
                     f"| {fmt(run.ttft_p50_ms)} | {fmt(run.ttft_p99_ms)} | {reasons} |")
    long = runs[1]
    share = long.output_tok_s / direct.output_tok_s if direct.output_tok_s else float("nan")
    met = long.errored == 0 and share >= 0.9
    lines += ["", (f"- Goal, through the worker with the objective covering the engine's wait: 0 errors and >= 0.9 of "
              f"direct output tok/s. Measured {long.errored} errors, {share:.2f}: **{'met' if met else 'missed'}**.")]
    if len(runs) > 2:
        default = runs[2]
        lines.append(
            f"- With the default objective: {default.errored} errors of {default.successful + default.errored} "
            f"requests; refusals by reason from `worker_admission_rejections_total`: "
            f"{', '.join(f'{r} {c}' for r, c in sorted(default.refusals.items())) or 'none'}. The throughput "
            f"profile sends all {shape.max_concurrency} streams at once; the engine takes "
            f"{shape.batch_slots} at a time, so the last of a wave waits "
            f"{shape.max_concurrency // shape.batch_slots - 1} request durations; the worker refuses a request "
            "whose predicted wait exceeds the objective (`predicted_wait`) or that is still queued at it "
            "(`queue_deadline`), with 429 and `Retry-After` before any byte.")
    return lines


def guidellm_version() -> str:
    from bench.common import package_version

    return package_version("guidellm")


def page(phases: list[Phase], setup: MockSetup, workload: Workload, guidellm_results: list[GuideLlmRun] | None,
         guide_shape: GuideLlmShape, plot_name: str, argv: list[str] | None) -> str:
    lines = [
        "# Scheduler benchmark: placement policies and the replicas' prefix caches", "",
        (f"Generated by `{command_line('bench.scheduler', argv)}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{describe_machine()}. The load generator, the worker and the engines share these cores: compare the "
        "policies with each other rather than reading absolute figures."), "",
        "## Setup", "",
        (f"Mock engine, {setup.replicas} replicas, `max_num_seqs` {setup.max_num_seqs}, one step = "
        f"{setup.step_base_ms:g} ms + {setup.step_per_seq_ms:g} ms per running sequence + "
        f"{setup.prefill_per_token_ms:g} ms per uncached prompt token (prefix caching on), "
        f"{setup.num_kv_blocks} KV blocks of {setup.block_size} tokens per replica "
        f"({setup.num_kv_blocks * setup.block_size:,} tokens), `max_num_batched_tokens` "
        f"{setup.max_num_batched_tokens}. Admission defaults (first-token objective 10 s, no queue in the "
        "engines: a replica takes a request only while it has a free batch slot), except in the last policy, "
        f"which sets `admission: {{queue_allowance: {ALLOWANCE}}}` (each replica may hold {ALLOWANCE} requests "
        "more than its batch slots, waiting in the engine)."), "",
        (f"Workload: {workload.tenants} tenants, each with a system prompt of ~{workload.system_words} tokens; a "
        f"session is {workload.turns} turns of a {workload.user_words}-token user message, each answer "
        f"({workload.output_tokens} tokens, streamed) appended to the history the next turn sends. All "
        f"tenants' prompts ({workload.tenants * workload.system_words:,} tokens) are about "
        f"{workload.tenants * workload.system_words / (setup.num_kv_blocks * setup.block_size):.1f}x one replica's "
        f"KV cache. Phases of {workload.duration_s:g} s each, the first {workload.warmup_s:g} s left out: "
        f"*saturation* ({workload.users} closed-loop users, each running sessions back to back), *0.8x* "
        "(sessions arriving as a Poisson process, turns at 0.8x least_loaded's completed turns/s at saturation), "
        f"*no shared prefix* ({workload.users} closed-loop users, each request a ~{workload.system_words}-token "
        "prompt of its own). No session header is sent: cache_aware finds the prefix in its index."), "",
        ("Definitions: output tok/s = output tokens of turns completed in the window / window; TTFT (vLLM's) = "
        "send to first SSE event with `choices`, turns sent in the window; hit rate = growth of "
        "`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` over the phase, all replicas; refused = 429/503 "
        "answers; worker CPU = user + system CPU of the worker process over the phase / requests (psutil; "
        "engines not counted)."), "",
        "## Results (mock engine)", "",
        *results_table(phases),
    ]
    lines += ["", f"![Output tok/s and p90 TTFT per policy]({plot_name})", "", "## Against the goals", "",
              *(line for policy in (CACHE_AWARE, CACHE_AWARE_ALLOWANCE) if policy in policies_in(phases)
                for line in goal_lines(phases, policy)), "", *reading_lines(phases), "", "## Not measured here", "", f"- {EXACT_NOT_MEASURED}",
              f"- {VLLM_PART}", ""]
    if guidellm_results:
        lines += [*guidellm_lines(guidellm_results, guide_shape), ""]
    return "\n".join(lines)


def plot(phases: Sequence[PhaseRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["saturation", "0.8x", "no shared prefix"]
    policies = policies_in(phases)
    figure, (tok_axis, ttft_axis) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(policies)
    for offset, policy in enumerate(policies):
        xs = [i + offset * width for i in range(len(names))]
        tok_axis.bar(xs, [by(phases, policy, n).output_tok_s for n in names], width, label=policy)
        ttft_axis.bar(xs, [by(phases, policy, n).ttft_ms(90) for n in names], width, label=policy)
    for axis, title in ((tok_axis, "output tok/s"), (ttft_axis, "TTFT p90 ms (log)")):
        axis.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(names))], names)
        axis.set_title(title)
    ttft_axis.set_yscale("log")
    tok_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


async def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    setup, workload = (QUICK_SETUP, QUICK_WORKLOAD) if args.quick else (MockSetup(), Workload())
    guide_shape = QUICK_GUIDELLM if args.quick else GuideLlmShape()
    work_dir = args.work_dir or Path(tempfile_dir())
    work_dir.mkdir(parents=True, exist_ok=True)
    phases = await policy_runs(setup, workload, work_dir, args.policies)
    guidellm_results = None if args.skip_guidellm else await guidellm_runs(guide_shape, work_dir)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.doc.with_suffix(".png")
    plot(phases, plot_path)
    args.doc.write_text(page(phases, setup, workload, guidellm_results, guide_shape, plot_path.name, argv))
    summary = {"phases": [p.summary() for p in phases],
               "guidellm": [vars(r) for r in guidellm_results] if guidellm_results else None}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.doc} and {plot_path} (work files in {work_dir})")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="scheduler-bench-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small run for a smoke test (well under a minute)")
    parser.add_argument("--skip-guidellm", action="store_true", help="leave out the GuideLLM part")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks-scheduler.md",
                        help="the page to write; the plot goes next to it (.png)")
    parser.add_argument("--policies", type=lambda text: [LEAST_LOADED, *text.split(",")],
                        help="comma-separated policies to run besides least_loaded (default: all of "
                             f"{', '.join(POLICIES)}); a page from a subset leaves the others' rows out")
    parser.add_argument("--work-dir", type=Path, help="logs and GuideLLM reports (default: a new temp dir, kept)")
    args = parser.parse_args(argv)
    asyncio.run(run(args, argv))


if __name__ == "__main__":
    main()
