"""Overload benchmark: how admission control keeps latency bounded when offered load exceeds capacity.

Starts `worker serve --engine mock` once per admission setting (the defaults, a first-token objective of
2 s, and off), measures the mock engine's capacity with a closed loop at `max_num_seqs` concurrency, then
offers open-loop Poisson load from 0.5x to 3x that capacity and records, per level: TTFT of served
streams (p50/p99), the share refused, how fast refusals come back (p50/p99), and the rate at which served
requests completed while the load was offered. Writes a markdown table to docs/overload.md.

TTFT here is vLLM's definition: from sending the request to the first SSE event that carries `choices`
(the mock, like vLLM, sends the role chunk together with the first token).

The load generator is a small open-loop client on aiohttp: `vllm bench serve`'s request functions keep
neither the status code nor the latency of a refused request (they only flag it as failed), and the
other generators (guidellm, aiperf) are not installed here. aiohttp parses HTTP in C: the client's own
time is part of every latency it measures, and httpx's was about 1 ms more per answer on 2 cores.

Usage: .venv/bin/python -m bench.overload [--duration-s 10] [--out docs/overload.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import yaml

from bench.arrivals import poisson_arrivals

MODEL = "bench/overload"
MAX_NUM_SEQS = 8
OUTPUT_TOKENS = 32
LOAD_FACTORS = (0.5, 0.8, 0.9, 1.0, 1.5, 2.0, 3.0)
SHORT_OBJECTIVE_S = 2.0
# models.yaml `admission:` per run; "on" is what a model gets by default.
MODES = {"on": {}, f"on, objective {SHORT_OBJECTIVE_S:g} s": {"ttft_objective_s": SHORT_OBJECTIVE_S},
         "off": {"enabled": False}}
# Served throughput is counted over the offered load's window less its first second (the queue filling).
RAMP_S = 1.0
# One engine step: 20 ms plus 1 ms per running sequence (a memory-bound decode step on a small scale).
MOCK_LATENCY = {"step_base_ms": 20.0, "step_per_seq_ms": 1.0, "prefill_per_token_ms": 0.0}


# -- the worker under test --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(port: int, admission: dict) -> dict:
    return {
        "worker": {"id": "overload-bench", "host": "127.0.0.1", "port": port},
        "models": [{
            "id": MODEL, "engine": "mock", "source": "local/overload",
            "engine_args": {"max_model_len": 2048, "max_num_seqs": MAX_NUM_SEQS},
            "admission": admission,
            "pricing": {"prompt_per_mtok": "0", "completion_per_mtok": "0"},
            "mock": MOCK_LATENCY,
        }],
    }


@contextlib.asynccontextmanager
async def worker(admission: dict, workdir: Path) -> AsyncIterator[str]:
    port = _free_port()
    config_path = workdir / f"models-{port}.yaml"
    config_path.write_text(yaml.safe_dump(_config(port, admission), sort_keys=False))
    env = {**os.environ, "WORKER_AUTH": "false", "WORKER_LOG_LEVEL": "warning",
           "WORKER_DB_URL": f"sqlite:///{workdir / 'ledger.db'}"}
    log_path = workdir / f"worker-{port}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "serve", "--config", str(config_path), "--engine", "mock",
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        base_url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=5)) as client:
                deadline = time.monotonic() + 120
                while True:
                    if process.returncode is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"worker did not become ready; see {log_path}")
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with client.get("/health/ready") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
            yield base_url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


# -- one request ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int  # 0: the connection failed
    ttft_s: float | None = None  # served streams only
    latency_s: float = 0.0  # until the whole answer was read
    completed: bool = False  # a served stream that ended with [DONE] and no error
    finished_at: float = 0.0  # perf_counter() when the answer had been read


def _body(index: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"request {index}: tell me about rivers"}],
            "max_tokens": OUTPUT_TOKENS, "stream": True}


async def one_request(client: aiohttp.ClientSession, index: int) -> Outcome:
    started = time.perf_counter()
    try:
        async with client.post("/v1/chat/completions", json=_body(index)) as response:
            if response.status != 200:
                await response.read()
                return Outcome(response.status, latency_s=time.perf_counter() - started)
            outcome = Outcome(200)
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue  # blank separators and keep-alive comments
                if line.rstrip() == b"data: [DONE]":
                    outcome.completed = outcome.ttft_s is not None
                elif outcome.ttft_s is None and b'"choices":[{' in line:
                    outcome.ttft_s = time.perf_counter() - started
                if b'"finish_reason":"error"' in line:
                    outcome.completed = False
                    break
            outcome.finished_at = time.perf_counter()
            outcome.latency_s = outcome.finished_at - started
            return outcome
    except aiohttp.ClientError:
        return Outcome(0, latency_s=time.perf_counter() - started)


# -- load shapes -------------------------------------------------------------------------------------


async def closed_loop_rate(client: aiohttp.ClientSession, concurrency: int, duration_s: float) -> float:
    """Completed requests per second with `concurrency` requests always open: the engine's capacity."""
    deadline = time.perf_counter() + duration_s
    done = 0
    counter = iter(range(10**9))

    async def user() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if (await one_request(client, next(counter))).completed:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def rejection_reasons(client: aiohttp.ClientSession) -> dict[str, int]:
    """The worker's own count of refusals by reason (`worker_admission_rejections_total`)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with client.get("/metrics") as response:
        text = await response.text()
    return {sample.labels["reason"]: int(sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "worker_admission_rejections_total"}


async def open_loop(client: aiohttp.ClientSession, rate: float, duration_s: float, seed: int,
                    started: float) -> list[Outcome]:
    """Requests sent at Poisson arrival times (from `started`, a perf_counter()) whatever happens to earlier ones."""
    tasks = []
    for index, at in enumerate(poisson_arrivals(rate, duration_s, seed)):
        delay = started + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(client, index)))
    return list(await asyncio.gather(*tasks))


async def liveness_round_trips(client: aiohttp.ClientSession, stop: asyncio.Event) -> list[float]:
    """`GET /health/live` every 50 ms: the floor any answer pays on this machine under the same load."""
    times = []
    while not stop.is_set():
        started = time.perf_counter()
        with contextlib.suppress(aiohttp.ClientError):
            async with client.get("/health/live") as response:
                await response.read()
            times.append(time.perf_counter() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return times


# -- reporting -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Level:
    mode: str
    factor: float
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)
    liveness_s: list[float] = field(default_factory=list)
    started: float = 0.0
    duration_s: float = 0.0

    @property
    def served(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def rejected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in (429, 503)]

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status not in (200, 429, 503) or (o.status == 200 and not o.completed))

    def ttft(self, q: float) -> float | None:
        return percentile([o.ttft_s for o in self.served if o.ttft_s is not None], q)

    def rejection_latency(self, q: float) -> float | None:
        return percentile([o.latency_s for o in self.rejected], q)

    @property
    def served_rate(self) -> float:
        """Served requests completed per second while the load was offered (after the ramp)."""
        window = (self.started + RAMP_S, self.started + self.duration_s)
        done = sum(1 for o in self.served if o.completed and window[0] <= o.finished_at <= window[1])
        return done / (self.duration_s - RAMP_S)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def report(levels: list[Level], capacity: float, duration_s: float, reasons: dict[str, dict[str, int]]) -> str:
    machine = (
        f"Generated by `bench/overload.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}); the load generator, the worker and the mock engine "
        "share these cores, so compare rows with each other rather than reading absolute figures."
    )
    setup = (
        f"Engine: the CPU mock engine, `max_num_seqs` {MAX_NUM_SEQS}, one step = "
        f"{MOCK_LATENCY['step_base_ms']:g} ms + {MOCK_LATENCY['step_per_seq_ms']:g} ms per running request, "
        f"{OUTPUT_TOKENS} output tokens per request, streaming. Measured capacity (closed loop at "
        f"{MAX_NUM_SEQS} concurrent requests): **{capacity:.2f} requests/s**. Each level offers Poisson arrivals "
        f"for {duration_s:g} s. Admission `on` is what a model gets by default (`ttft_objective_s` 10 s); "
        f"`on, objective {SHORT_OBJECTIVE_S:g} s` sets `admission: {{ttft_objective_s: {SHORT_OBJECTIVE_S:g}}}`; "
        "`off` (`admission: {enabled: false}`) binds every request to the replica at once and lets the engine "
        "queue everything, as plain vLLM does."
    )
    definitions = (
        "TTFT: from sending the request to the first SSE event with `choices`, served requests only. "
        "Refusal latency: from sending the request to having read the whole 429/503 answer. Served/s: served "
        f"requests that completed while the load was offered (its first {RAMP_S:g} s left out), per second, and "
        "as a share of the measured capacity. Liveness: `GET /health/live` round trips sent every 50 ms during "
        "the level by the same client, the floor that any answer pays on this machine under that load."
    )
    how = (
        "Admitted requests wait in the worker, in a fair queue per model (round-robin across accounts, with optional key "
        "priority), and are bound to a replica only when one has room: fewer than `max_in_flight` requests "
        "open on it (default `max_num_seqs + max_num_seqs // 32`), the engine's waiting queue shorter than "
        "`max_waiting`, its KV cache below `max_kv_cache_usage` (0.95), and its numbers fresh. A new request "
        "is refused with 429 `rate_limit_exceeded` and `Retry-After` only when its predicted wait (the work "
        "queued ahead of it over the rate the replicas are completing work) exceeds the model's "
        "`admission.ttft_objective_s`, when the queue's memory bound (`max_queued`, `max_queued_bytes`) is "
        "reached, or when it is still queued at its objective; all of these before any byte of the answer. "
        "All limits are per model under `admission:` in models.yaml."
    )
    lines = [
        "# Overload behaviour: admission control on and off",
        "",
        machine,
        "",
        "## How the worker decides",
        "",
        how,
        "",
        "## Results",
        "",
        setup,
        "",
        definitions,
        "",
        ("| admission | load | offered req/s | requests | served | refused | served/s | of capacity "
         "| TTFT p50 ms | TTFT p99 ms | refusal p50 ms | refusal p99 ms | liveness p50 ms | liveness p99 ms "
         "| failed |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        share = len(level.rejected) / len(level.outcomes) if level.outcomes else 0.0
        lines.append(
            f"| {level.mode} | {level.factor:g}x | {level.rate:.1f} | {len(level.outcomes)} "
            f"| {len(level.served)} | {share:.0%} | {level.served_rate:.2f} | {level.served_rate / capacity:.2f} "
            f"| {_ms(level.ttft(50))} | {_ms(level.ttft(99))} "
            f"| {_ms(level.rejection_latency(50))} | {_ms(level.rejection_latency(99))} "
            f"| {_ms(percentile(level.liveness_s, 50))} | {_ms(percentile(level.liveness_s, 99))} | {level.failed} |")
    for mode, counts in reasons.items():
        if counts:
            listed = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            lines.append(f"\nRefusals by reason, admission `{mode}`, all levels: {listed}.")
    by_key = {(level.mode, level.factor): level for level in levels}
    lines += ["", "## Against the goals", ""]
    for mode, objective_s in (("on", 10.0), (f"on, objective {SHORT_OBJECTIVE_S:g} s", SHORT_OBJECTIVE_S)):
        low = [level for level in levels if level.mode == mode and level.factor <= 0.9]
        refused_low = sum(len(level.rejected) for level in low)
        requests_low = sum(len(level.outcomes) for level in low)
        lines.append(f"- Admission `{mode}`, loads up to 0.9x: {refused_low} of {requests_low} requests refused; "
                     f"goal: 0. {'Met' if refused_low == 0 else 'Missed'}.")
        high = by_key.get((mode, 3.0))
        if high is not None:
            share = high.served_rate / capacity if capacity else float("nan")
            p99 = high.ttft(99)
            lines.append(
                f"- Admission `{mode}`, 3x load: served {high.served_rate:.2f} requests/s, {share:.2f} of the "
                f"engine's measured maximum (goal: at least 0.95, {'met' if share >= 0.95 else 'missed'}); p99 "
                f"TTFT of served requests {_ms(p99)} ms against the objective {objective_s * 1000:.0f} ms "
                f"({'within' if p99 is not None and p99 <= objective_s else 'over'}).")
    off_high, on_high = by_key.get(("off", 3.0)), by_key.get(("on", 3.0))
    if off_high and off_high.ttft(99) and on_high and on_high.ttft(99):
        lines.append(f"- Without admission control the p99 TTFT at 3x is {_ms(off_high.ttft(99))} ms "
                     f"({off_high.ttft(99) / on_high.ttft(99):.1f}x the admission-on figure); nothing is refused "
                     "and the engine's own queue grows for as long as the overload lasts.")
    refusals = [o.latency_s for level in levels if level.mode != "off" for o in level.rejected]
    if refusals:
        floor = [t for level in levels if level.mode != "off" and level.rejected for t in level.liveness_s]
        at_arrival = [t for t in refusals if t < 1.0]
        lines.append(f"- Refusals with admission on: {len(refusals)}, of which {len(at_arrival)} at arrival "
                     f"(predicted wait over the objective: p50 {_ms(percentile(at_arrival, 50))} ms, "
                     f"p99 {_ms(percentile(at_arrival, 99))} ms; goal: within 5 ms) and {len(refusals) - len(at_arrival)} "
                     "at the queue deadline, after waiting the whole objective (`queue_deadline`: the prediction was "
                     f"too optimistic for them). Liveness round trips at the same levels: p50 "
                     f"{_ms(percentile(floor, 50))} ms, p99 {_ms(percentile(floor, 99))} ms.")
    lines.append("")
    return "\n".join(lines)


async def run(duration_s: float, out: Path) -> None:
    levels: list[Level] = []
    reasons: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="overload-bench-") as tmp:
        workdir = Path(tmp)
        capacity = 0.0
        for mode, admission in MODES.items():
            async with worker(admission, workdir) as base_url, aiohttp.ClientSession(
                    base_url, timeout=aiohttp.ClientTimeout(total=300),
                    connector=aiohttp.TCPConnector(limit=0)) as client:
                await closed_loop_rate(client, MAX_NUM_SEQS, 2.0)  # warm up connections and the engine
                if not capacity:
                    capacity = await closed_loop_rate(client, MAX_NUM_SEQS, duration_s)
                    print(f"capacity: {capacity:.2f} requests/s", flush=True)
                    await asyncio.sleep(1.0)
                for seed, factor in enumerate(LOAD_FACTORS):
                    level = Level(mode, factor, capacity * factor, started=time.perf_counter(),
                                  duration_s=duration_s)
                    stop = asyncio.Event()
                    probe = asyncio.create_task(liveness_round_trips(client, stop))
                    level.outcomes = await open_loop(client, level.rate, duration_s, seed, level.started)
                    stop.set()
                    level.liveness_s = await probe
                    levels.append(level)
                    print(f"admission {mode:<11} {factor:>4}x: {len(level.outcomes)} requests, "
                          f"{len(level.rejected)} refused, served {level.served_rate:.2f}/s, "
                          f"TTFT p99 {_ms(level.ttft(99))} ms, "
                          f"refusal p99 {_ms(level.rejection_latency(99))} ms", flush=True)
                    await asyncio.sleep(2.0)  # let the queue and the engine empty between levels
                reasons[mode] = await rejection_reasons(client)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(levels, capacity, duration_s, reasons))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of offered load per level")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "overload.md")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args.duration_s, args.out))
    except ImportError:
        asyncio.run(run(args.duration_s, args.out))


if __name__ == "__main__":
    main()
