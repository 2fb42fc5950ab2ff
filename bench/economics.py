"""Workload economics benchmark: what a model served on the mock engine earns against what its GPUs cost,
from light load to saturation, as `worker economics` reads it from the ledger.

    .venv/bin/python -m bench.economics [--quick] [--doc docs/economics.md]
    .venv/bin/python -m bench.economics --render WORK_DIR/summary.json   # the page again, from a run's figures

One `worker serve` with the ledger on (SQLite) and auth off, one model on the mock engine (2 replicas of
1 GPU each, priced per token in `models.yaml`, `worker.gpu_hour_usd` set). Non-streamed chat completions
of a fixed mix of prompt and output lengths, drawn in turn by a seeded generator. The first step is
saturation (closed loop: more users than the replicas have batch slots, each sending its next request when
the last one ends); the others are open loop, requests arriving as a Poisson process at fractions of the
request rate saturation completed. Once the worker has stopped (so that the ledger holds every record and
the replicas' stop), `worker economics --format json` over each step's window (from its first request to
its last answer) gives the step's figures; `worker economics --plot` over the whole run draws the revenue,
GPU cost and utilisation.

The mock's GPU seconds are exact (its scheduler splits each step's measured time among the sequences in
it), and the worker also counts each replica's busy time (a request in flight): the page shows both, so
attributed over busy is the share of busy time the engine spent computing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.arrivals import poisson_arrivals
from bench.common import command_line, describe_machine, fmt, table_head
from bench.scheduler import every_replica_answers
from tests.support.worker_process import WorkerProcess, start_worker

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench/economics"
START_TIMEOUT_S = 120.0
# How the figures on this page come about, and how far the worker's estimate for engines that report no
# GPU time (vLLM) is from the exact figure (measured against the mock's own accounting).
ESTIMATOR_NOTE = (
    "On the mock the GPU seconds are exact: each engine step's measured time is the replica's busy time, "
    "split among the sequences in the step by the latency model's terms (the step's base cost shared equally, "
    "the per-sequence cost to each, the per-token prefill cost by each sequence's prefill tokens in the step), "
    "scaled so that the shares sum to the step's time. vLLM reports no such figure: there the worker estimates "
    "each request's share of its replica's busy time (a request in flight) from what it observes, each "
    "request weighing as many sequences as it runs, twice as much before a stream's first byte (prefill) as "
    "after (`worker/capacity/gpu_time.py`). Against the mock's exact accounting on a mixed load (prompts of "
    "5-400 words, 4-96 output tokens, half streamed, 15% with n=2), the estimate's error per request was, "
    "median / p90: 2.0% / 8.9% with 4 requests in flight, 4.3% / 15% with 16, 10% / 34% with 48 (worst 46%, "
    "45%, 333%: short prompts beside long ones; [benchmarks-gpu-time.md](benchmarks-gpu-time.md), generated "
    "by `bench/gpu_time.py`, also compares other weights). Summed over requests it conserves the busy time "
    "exactly, by construction; the worker-seen busy time (lease to end) runs a few percent above the engine's "
    "own compute, the `attributed / busy` column above. The Grafana row's NVML series, the cross-check on GPU "
    "nodes, was not run here: this machine has no GPU."
)
WORDS = ("the", "river", "carries", "light", "and", "stone", "through", "garden", "where", "people", "read",
         "paper", "signal", "music", "engine", "queue", "batch", "token", "model", "window", "years", "good")


@dataclass(frozen=True)
class Setup:
    """The node: the mock's latency model (one step = base + per running sequence + per prefill token),
    the model's prices per million tokens and the price of a GPU-hour."""

    replicas: int = 2
    gpus_per_replica: int = 1
    max_num_seqs: int = 16
    step_base_ms: float = 6.0
    step_per_seq_ms: float = 0.4
    prefill_per_token_ms: float = 0.02
    prompt_per_mtok: str = "0.20"
    completion_per_mtok: str = "0.80"
    gpu_hour_usd: str = "2.00"


@dataclass(frozen=True)
class Workload:
    # (prompt words, output tokens): a short question, a long answer, a long document summarised.
    mix: tuple[tuple[int, int], ...] = ((64, 32), (256, 192), (1024, 64))
    saturation_users: int = 48  # closed loop, 1.5x the replicas' batch slots
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)  # of saturation's completed requests/s
    step_s: float = 50.0  # each step sends requests for this long, then waits for the last answers
    # Each step starts on a whole UTC minute, so that the minute buckets of `worker economics` (its peak, its
    # plot) hold one step each; else each starts `pause_s` after the last one ended.
    whole_minutes: bool = True
    pause_s: float = 0.5


QUICK_WORKLOAD = Workload(mix=((16, 8), (64, 24)), saturation_users=8, fractions=(0.25, 0.75), step_s=3.0,
                          whole_minutes=False)


# -- the load ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int  # 0: the connection failed
    started: float
    finished: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    gpu_seconds: float = 0.0


def request_body(rng: random.Random, workload: Workload) -> dict[str, Any]:
    prompt_words, output_tokens = workload.mix[rng.randrange(len(workload.mix))]
    text = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": output_tokens}


async def one_request(client: aiohttp.ClientSession, body: dict[str, Any]) -> Outcome:
    outcome = Outcome(0, time.time())
    try:
        async with client.post("/v1/chat/completions", data=orjson.dumps(body),
                               headers={"content-type": "application/json"}) as response:
            outcome.status = response.status
            payload = await response.read()
            if response.status == 200:
                usage = orjson.loads(payload)["usage"]
                outcome.prompt_tokens, outcome.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                outcome.cost_usd = float(usage.get("cost") or 0.0)
                outcome.gpu_seconds = float(response.headers.get("x-worker-gpu-seconds") or 0.0)
    except aiohttp.ClientError:
        outcome.status = 0
    outcome.finished = time.time()
    return outcome


async def closed_loop(client: aiohttp.ClientSession, workload: Workload, users: int, seed: int) -> list[Outcome]:
    deadline = time.monotonic() + workload.step_s
    outcomes: list[Outcome] = []

    async def user(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < deadline:
            outcomes.append(await one_request(client, request_body(rng, workload)))

    await asyncio.gather(*(user(n) for n in range(users)))
    return outcomes


async def open_loop(client: aiohttp.ClientSession, workload: Workload, rate: float, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    started = time.monotonic()
    tasks = []
    for at in poisson_arrivals(rate, workload.step_s, seed):
        delay = started + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(client, request_body(rng, workload))))
    return list(await asyncio.gather(*tasks))


# -- reading the worker ------------------------------------------------------------------------------


async def counters(client: aiohttp.ClientSession) -> dict[str, float]:
    """The worker's economics counters for the model, summed over its replicas."""
    async with client.get("/metrics") as response:
        text = await response.text()
    wanted = {"worker_gpu_seconds_attributed_total", "worker_replica_busy_gpu_seconds_total",
              "worker_revenue_usd_total"}
    found = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model", MODEL) == MODEL:
                found[sample.name] += sample.value
    return found


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Ledger:
    """`worker economics` on the run's database and configuration."""

    db_url: str
    config: Path

    def command(self, since: float, until: float, *extra: str) -> list[str]:
        return [sys.executable, "-m", "worker", "economics", "--db-url", self.db_url, "--config", str(self.config),
                "--since", iso(since), "--until", iso(until), "--model", MODEL, *extra]

    def run(self, since: float, until: float, *extra: str) -> str:
        result = subprocess.run(self.command(since, until, *extra), capture_output=True, text=True, check=False,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"worker economics failed ({result.returncode}): {result.stderr[-3000:]}")
        return result.stdout

    def report(self, since: float, until: float) -> dict[str, Any]:
        return dict(json.loads(self.run(since, until, "--format", "json")))


def model_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The model's figures in a `worker economics --format json` report."""
    models = report["models"]
    entries = models if isinstance(models, list) else [{"model": name, **figures} for name, figures in models.items()]
    (entry,) = [entry for entry in entries if entry.get("model") == MODEL]
    return dict(entry)


# -- one step ----------------------------------------------------------------------------------------


@dataclass
class Step:
    label: str  # "saturation", or the fraction of it offered ("0.25x")
    offered_rps: float | None  # None: closed loop
    since: float
    until: float
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    economics: dict[str, Any] = field(default_factory=dict)  # the model's figures from `worker economics`
    attributed_gpu_s: float = 0.0  # growth of the worker's counters over the step
    busy_gpu_s: float = 0.0
    revenue_counter_usd: float = 0.0

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if o["status"] == 200]

    @property
    def completed_rps(self) -> float:
        return len(self.ok) / (self.until - self.since)

    @property
    def output_tok_s(self) -> float:
        return sum(o["completion_tokens"] for o in self.ok) / (self.until - self.since)

    @property
    def in_flight(self) -> float:
        """Requests in flight on average over the window (Little's law: their summed durations / the window)."""
        return sum(o["finished"] - o["started"] for o in self.ok) / (self.until - self.since)

    @property
    def failed(self) -> int:
        return len(self.outcomes) - len(self.ok)

    @property
    def client_cost_usd(self) -> float:
        return sum(o["cost_usd"] for o in self.ok)

    @property
    def client_gpu_s(self) -> float:
        return sum(o["gpu_seconds"] for o in self.ok)

    def figure(self, key: str) -> float:
        value = self.economics.get(key)
        return float(value) if value is not None else float("nan")

    @property
    def gpu_s_per_1k_output(self) -> float:
        tokens = self.figure("completion_tokens")
        return self.figure("gpu_seconds") / tokens * 1000 if tokens else float("nan")

    @classmethod
    def from_summary(cls, item: dict[str, Any]) -> Step:
        return cls(**item)


async def measure(client: aiohttp.ClientSession, label: str, offered: float | None,
                  load: Callable[[], Awaitable[list[Outcome]]]) -> Step:
    before = await counters(client)
    since = time.time()
    outcomes = await load()
    until = time.time()
    after = await counters(client)
    step = Step(label, offered, since, until, [asdict(o) for o in outcomes])
    step.attributed_gpu_s = after["worker_gpu_seconds_attributed_total"] - before["worker_gpu_seconds_attributed_total"]
    step.busy_gpu_s = after["worker_replica_busy_gpu_seconds_total"] - before["worker_replica_busy_gpu_seconds_total"]
    step.revenue_counter_usd = after["worker_revenue_usd_total"] - before["worker_revenue_usd_total"]
    print(f"{label:<11} {step.completed_rps:6.2f} req/s {step.output_tok_s:8.0f} output tok/s  attributed "
          f"{step.attributed_gpu_s:.2f} GPU s  busy {step.busy_gpu_s:.2f} GPU s  failed {step.failed}", flush=True)
    return step


async def until_next_step(workload: Workload) -> None:
    now = time.time()
    await asyncio.sleep(60 - now % 60 if workload.whole_minutes else workload.pause_s)


def model_entry(setup: Setup) -> dict[str, Any]:
    return {
        "id": MODEL, "engine": "mock", "source": f"local/{MODEL}", "replicas": setup.replicas,
        "gpus_per_replica": setup.gpus_per_replica,
        "engine_args": {"max_model_len": 4096, "max_num_seqs": setup.max_num_seqs, "max_num_batched_tokens": 8192},
        "pricing": {"prompt_per_mtok": setup.prompt_per_mtok, "completion_per_mtok": setup.completion_per_mtok},
        "mock": {"step_base_ms": setup.step_base_ms, "step_per_seq_ms": setup.step_per_seq_ms,
                 "prefill_per_token_ms": setup.prefill_per_token_ms},
    }


async def run_steps(setup: Setup, workload: Workload, work_dir: Path, db_url: str) -> list[Step]:
    config = {"worker": {"id": "economics-bench", "gpu_hour_usd": setup.gpu_hour_usd}, "models": [model_entry(setup)]}
    worker: WorkerProcess = start_worker(work_dir, config, env={
        "WORKER_AUTH": "false", "WORKER_LEDGER": "true", "WORKER_DB_URL": db_url, "WORKER_LOG_LEVEL": "warning"})
    steps: list[Step] = []
    try:
        await asyncio.to_thread(worker.wait_ready, START_TIMEOUT_S)
        await every_replica_answers(worker, MODEL, setup.replicas, START_TIMEOUT_S)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(worker.base_url, timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as client:
            await until_next_step(workload)
            saturation = await measure(client, "saturation", None,
                                       lambda: closed_loop(client, workload, workload.saturation_users, seed=1))
            steps.append(saturation)
            for number, fraction in enumerate(workload.fractions):
                await until_next_step(workload)
                rate = fraction * saturation.completed_rps
                steps.append(await measure(client, f"{fraction:g}x", rate,
                                           lambda rate=rate, seed=number + 2: open_loop(client, workload, rate, seed)))
    finally:
        await asyncio.to_thread(worker.stop)
    return steps


# -- the page ----------------------------------------------------------------------------------------


def by_load(steps: list[Step]) -> list[Step]:
    """Lightest first; saturation last."""
    return sorted(steps, key=lambda s: (s.offered_rps is None, s.offered_rps or 0.0))


def usd(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def results_table(steps: list[Step]) -> list[str]:
    lines = table_head("| load | offered req/s | completed req/s | output tok/s | failed | utilisation "
                       "| GPU s per 1k output tokens | break-even $/Mtok | revenue $ | GPU cost $ | margin $ |")
    for s in by_load(steps):
        offered = fmt(s.offered_rps, 2) if s.offered_rps is not None else "closed loop"
        lines.append(
            f"| {s.label} | {offered} | {fmt(s.completed_rps, 2)} | {fmt(s.output_tok_s)} | {s.failed} "
            f"| {fmt(s.figure('utilization'), 3)} | {fmt(s.gpu_s_per_1k_output, 3)} "
            f"| {usd(s.figure('break_even_usd_per_mtok'), 3)} | {usd(s.figure('revenue_usd'), 6)} | {usd(s.figure('gpu_cost_usd'), 6)} "
            f"| {usd(s.figure('margin_usd'), 6)} |")
    return lines


def checks_table(steps: list[Step]) -> list[str]:
    lines = table_head("| load | window s | ledger revenue $ | clients' usage.cost $ | revenue counter $ "
                       "| attributed GPU s (ledger) | attributed GPU s (counter) | busy GPU s (counter) "
                       "| attributed / busy |")
    for s in by_load(steps):
        share = s.attributed_gpu_s / s.busy_gpu_s if s.busy_gpu_s else float("nan")
        lines.append(
            f"| {s.label} | {fmt(s.until - s.since, 1)} | {usd(s.figure('revenue_usd'), 6)} "
            f"| {usd(s.client_cost_usd, 6)} | {usd(s.revenue_counter_usd, 6)} | {fmt(s.figure('gpu_seconds'), 3)} "
            f"| {fmt(s.attributed_gpu_s, 3)} | {fmt(s.busy_gpu_s, 3)} | {fmt(share, 3)} |")
    return lines


def blended_price(steps: list[Step]) -> float:
    """What the clients paid per million tokens (prompt and completion) over the run."""
    revenue = sum(s.figure("revenue_usd") for s in steps)
    tokens = sum(s.figure("prompt_tokens") + s.figure("completion_tokens") for s in steps)
    return revenue / tokens * 1e6 if tokens else float("nan")


def reading_lines(steps: list[Step], run: dict[str, Any], replicas: int, max_num_seqs: int) -> list[str]:
    """What the table says, in figures from this run."""
    ordered = by_load(steps)
    light, saturation = ordered[0], ordered[-1]
    price = blended_price(steps)
    paying = [s for s in ordered if s.figure("break_even_usd_per_mtok") <= price]
    crossing = (f"so the model paid for its GPUs from {paying[0].label} on (margin "
                f"{usd(paying[0].figure('margin_usd'), 6)} $ in that step) and not below it"
                if paying else "so at no load of this run did the model pay for its GPUs")
    return [
        (f"The clients paid {usd(price, 3)} $ per million tokens on average at this mix. Breaking even took "
         f"{usd(light.figure('break_even_usd_per_mtok'), 3)} $/Mtok at {light.label} of saturation and "
         f"{usd(saturation.figure('break_even_usd_per_mtok'), 3)} $/Mtok at saturation, {crossing}: the "
         "replicas' GPUs cost the same whether they compute or not, so the break-even price falls as the "
         "tokens served per hour rise."),
        "",
        (f"Utilisation is the share of the provisioned time the engines computed, not how full their batches "
         f"were: at {light.label} the engines computed {fmt(light.figure('utilization') * 100)}% of the time with "
         f"{fmt(light.in_flight / replicas, 1)} requests open per replica on average (each mock step costs its "
         f"base time whatever its batch), at saturation {fmt(saturation.figure('utilization') * 100)}% with "
         f"{fmt(saturation.in_flight / replicas, 1)} (a batch of at most {max_num_seqs}, the rest waiting for a "
         "slot). What grows with load is the batch: the GPU seconds per 1k "
         "output tokens fall "
         f"from {fmt(light.gpu_s_per_1k_output, 2)} to {fmt(saturation.gpu_s_per_1k_output, 2)}, since a "
         "step's time is shared by every sequence in it."),
        "",
        (f"At full load: over the whole run, `worker economics` finds the model's highest throughput, "
         f"{fmt(float(run['peak_tokens_per_gpu_hour'] or 'nan'))} tokens per provisioned GPU-hour, in its busiest "
         f"whole UTC minute; had it run at that rate all along, breaking even would have taken "
         f"{usd(float(run['break_even_usd_per_mtok_at_peak'] or 'nan'), 3)} $/Mtok "
         f"(`break_even_usd_per_mtok_at_peak`), against {usd(float(run['break_even_usd_per_mtok'] or 'nan'), 3)} "
         "$/Mtok for the run as it went, lighter steps and the pauses between them included."
         + (f" It is above the saturation step's own {usd(saturation.figure('break_even_usd_per_mtok'), 3)}: "
            "the busiest minute holds the whole saturation step and the idle seconds between its last answer and "
            "the next step." if float(run["break_even_usd_per_mtok_at_peak"] or "nan")
            > saturation.figure("break_even_usd_per_mtok") else "")),
    ]


def page(summary: dict[str, Any], steps: list[Step], figure_name: str, plot_name: str) -> str:
    setup, workload = Setup(**summary["setup"]), summary["workload"]
    mix = ", ".join(f"{p} prompt words / {o} output tokens" for p, o in workload["mix"])
    run = summary["whole_run"]
    lines = [
        "# Workload economics on the mock engine", "",
        (f"Generated by `{summary['command']}` on {summary['generated_at']}, {summary['machine']}. The load "
         "generator, the worker and the engines share these cores."), "",
        "## Setup", "",
        (f"One `worker serve` (ledger on SQLite, auth off) with one model on the mock engine: {setup.replicas} "
         f"replicas of {setup.gpus_per_replica} GPU each, `max_num_seqs` {setup.max_num_seqs}, one engine step = "
         f"{setup.step_base_ms:g} ms + {setup.step_per_seq_ms:g} ms per running sequence + "
         f"{setup.prefill_per_token_ms:g} ms per uncached prompt token. Prices in `models.yaml`: "
         f"${setup.prompt_per_mtok} per million prompt tokens, ${setup.completion_per_mtok} per million completion "
         f"tokens; `worker.gpu_hour_usd: \"{setup.gpu_hour_usd}\"`."), "",
        (f"Load: non-streamed chat completions, each drawn from an equal mix of {mix} (the mock generates "
         f"exactly the tokens asked for). *saturation*: {workload['saturation_users']} closed-loop users for "
         f"{workload['step_s']:g} s; then open loop, Poisson arrivals at "
         f"{', '.join(f'{f:g}x' for f in workload['fractions'])} saturation's completed requests/s for "
         f"{workload['step_s']:g} s each. A step's window runs from its first request to its last answer; each "
         "row is `worker economics --format json --since ... --until ...` over that window, run once the worker "
         "had stopped (the ledger then holds every record, and the replicas' up-time their stop)."), "",
        ("Definitions (`worker economics`): utilisation = attributed GPU seconds / provisioned GPU seconds (the "
         "replicas' up-time in the window x their GPUs); GPU cost = provisioned GPU-hours x the GPU-hour price; "
         "margin = revenue (the ledger's charges) - GPU cost; break-even = GPU cost / tokens served (prompt + "
         "completion) x 1e6, the price per million tokens at which this load pays for its GPUs; break-even at "
         "peak = the same had the model run all its provisioned time at the highest throughput it sustained in "
         "a whole minute of the window. All of them: `worker economics --help`."), "",
        "## Results", "",
        *results_table(steps), "",
        f"![Break-even price per million tokens against load]({figure_name})", "",
        *reading_lines(steps, run, setup.replicas, setup.max_num_seqs), "",
        "## Checks", "",
        ("The ledger's revenue against the sum of `usage.cost` the clients were told and against the growth of "
         "`worker_revenue_usd_total`; the ledger's attributed GPU seconds against the growth of "
         "`worker_gpu_seconds_attributed_total` and of `worker_replica_busy_gpu_seconds_total` (time with a "
         "request in flight x GPUs, as the worker sees it)."), "",
        *checks_table(steps), "",
        "## Over the whole run", "",
        "`worker economics --plot` over the run (all steps and the pauses between them):", "",
        f"![Revenue and GPU cost over time, and utilisation]({plot_name})", "",
        "`worker economics` (table) over the run:", "",
        "```", summary["table"].rstrip(), "```", "",
    ]
    lines += ["## Exact on the mock, estimated on vLLM", "", ESTIMATOR_NOTE, ""]
    return "\n".join(lines)


def break_even_figure(steps: list[Step], price: float, at_peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = by_load(steps)
    load = [s.output_tok_s for s in ordered]
    figure, (price_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    price_axis.plot(load, [s.figure("break_even_usd_per_mtok") for s in ordered], "o-",
                    label="break-even at the step's load")
    price_axis.axhline(at_peak, color="tab:orange", linestyle="--", label=f"break-even at the run's peak ({at_peak:.3f})")
    price_axis.axhline(price, color="grey", linestyle=":", label=f"charged at this mix ({price:.3f})")
    for number, (s, x) in enumerate(zip(ordered, load, strict=True)):
        last = number == len(ordered) - 1  # labelled to its left, inside the axes
        price_axis.annotate(f"{s.label}, {s.figure('utilization'):.0%} utilised", (x, s.figure("break_even_usd_per_mtok")),
                            textcoords="offset points", xytext=(-6, -3) if last else (5, 4),
                            ha="right" if last else "left", va="top" if last else "baseline", fontsize=8)
    price_axis.set_yscale("log")
    price_axis.set_xlabel("output tokens/s (both replicas)")
    price_axis.set_ylabel("$ per million tokens (log)")
    price_axis.set_title("Break-even price against load")
    price_axis.legend(fontsize=8)
    time_axis.plot(load, [s.gpu_s_per_1k_output for s in ordered], "o-")
    time_axis.set_xlabel("output tokens/s (both replicas)")
    time_axis.set_ylabel("GPU seconds per 1k output tokens")
    time_axis.set_title("Attributed GPU time per output token")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def read_back(summary_path: Path, plot: Path) -> dict[str, Any]:
    """Fill in what `worker economics` says of each step and of the whole run, and its plot, where the summary
    lacks them; run once the worker has stopped (a running replica's up-time is in the database only up to
    its last heartbeat: its stop records the rest)."""
    summary = json.loads(summary_path.read_text())
    ledger = Ledger(summary["db_url"], Path(summary["config"]))
    for step in summary["steps"]:
        if not step["economics"]:
            step["economics"] = model_figures(ledger.report(step["since"], step["until"]))
            summary_path.write_text(json.dumps(summary, indent=1))
    since, until = min(s["since"] for s in summary["steps"]), max(s["until"] for s in summary["steps"])
    if "whole_run" not in summary:
        plot.parent.mkdir(parents=True, exist_ok=True)
        ledger.run(since, until, "--plot", str(plot))
        summary["table"] = ledger.run(since, until, "--format", "table")
        summary["whole_run"] = model_figures(ledger.report(since, until))
        summary_path.write_text(json.dumps(summary, indent=1))
    return dict(summary)


def render(summary_path: Path, doc: Path) -> None:
    """The page and the break-even figure from a run's summary.json (completed first where it lacks the
    read-back figures, e.g. after `worker economics` failed)."""
    summary = read_back(summary_path, doc.with_suffix(".png"))
    steps = [Step.from_summary(item) for item in summary["steps"]]
    doc.parent.mkdir(parents=True, exist_ok=True)
    figure = doc.with_name(f"{doc.stem}-break-even.png")
    at_peak = float(summary["whole_run"]["break_even_usd_per_mtok_at_peak"] or "nan")
    break_even_figure(steps, blended_price(steps), at_peak, figure)
    doc.write_text(page(summary, steps, figure.name, doc.with_suffix(".png").name))
    for step in by_load(steps):
        print(f"{step.label:<11} utilisation {step.figure('utilization'):.3f}  break-even "
              f"{step.figure('break_even_usd_per_mtok'):.3f} $/Mtok", flush=True)


async def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    setup, workload = Setup(), QUICK_WORKLOAD if args.quick else Workload()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="economics-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{work_dir / 'ledger.db'}"
    steps = await run_steps(setup, workload, work_dir, db_url)
    summary = {
        "command": command_line("bench.economics", argv),
        "generated_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": describe_machine(),
        "setup": asdict(setup), "workload": asdict(workload),
        "db_url": db_url, "config": str(work_dir / "models.yaml"),
        "steps": [asdict(s) for s in steps],
    }
    summary_path = work_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    await asyncio.to_thread(render, summary_path, args.doc)
    print(f"wrote {args.doc} and its figures (work files and summary.json in {work_dir})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small run for a smoke test (well under a minute)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "economics.md",
                        help="the page to write; `worker economics --plot` goes next to it (.png), the "
                             "break-even figure to NAME-break-even.png")
    parser.add_argument("--work-dir", type=Path, help="logs, the ledger and summary.json (default: a new temp dir)")
    parser.add_argument("--render", type=Path, metavar="SUMMARY_JSON",
                        help="write the page from an earlier run's summary.json instead of running (what the "
                             "summary lacks of `worker economics`, e.g. after it failed, is read back first)")
    args = parser.parse_args(argv)
    if args.render is not None:
        render(args.render, args.doc)
        return
    asyncio.run(run(args, argv))


if __name__ == "__main__":
    main()
