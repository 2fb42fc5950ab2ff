"""What the usage ledger's write path costs: worker throughput with the ledger on vs. off, side by side.

    .venv/bin/python -m bench.ledger [--concurrency 8 32] [--rounds 30] [--scale 8]
                                     [--doc docs/benchmarks-ledger.md]

Three real `worker serve --engine config` processes, identical but for the ledger (auth and admission
control off in all): off (`WORKER_LEDGER=false`), on with SQLite's default `synchronous=NORMAL`, and on
with `WORKER_DB_SYNCHRONOUS=full`; each in front of its own zero-cost mock engine, configured alike: only
where the engine costs nothing is the worker the bottleneck, and the ledger's cost visible. At each
concurrency the same load (`vllm bench serve`, run in-process) goes to the three workers in turn for
--rounds rounds, each going first in turn; the report gives each ledger setting's cost,
1 - tok/s with / tok/s without, pooled and as the median of the per-round ratios, with their spread.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import (
    ENGINES,
    BenchWorker,
    CpuPerRequest,
    LoadGenerator,
    LoadShape,
    PathSamples,
    add_output_arguments,
    command_line,
    configure_logging,
    describe_machine,
    fmt,
    pct,
    rotated,
    running_worker,
    table_head,
    vllm_version,
)
from tests.fixtures.tiny_model import make_tiny_model
from worker.billing.store.journal import JOURNAL_FLUSH_S

logger = logging.getLogger("bench.ledger")

SETUP = ENGINES["mock"]
LEDGER_PATHS = ("ledger_on", "ledger_full", "ledger_off")
# The worker's settings per path: the ledger switch and WORKER_DB_SYNCHRONOUS (None: the default, normal).
PATH_SETTINGS: dict[str, tuple[bool, str | None]] = {
    "ledger_on": (True, None), "ledger_full": (True, "full"), "ledger_off": (False, None)}
PATH_NAMES = {"ledger_on": "on (default, synchronous=NORMAL)", "ledger_full": "on, synchronous=FULL"}


@dataclass
class LedgerRow:
    """The worker with the ledger on against one with it off, at one concurrency."""

    engine: str
    concurrency: int
    requests_per_run: int
    paths: dict[str, PathSamples] = field(default_factory=lambda: {path: PathSamples() for path in LEDGER_PATHS})
    # CPU time of each worker (its process and its billing database's; not its engine) per request served.
    worker_cpu: dict[str, CpuPerRequest] = field(
        default_factory=lambda: {path: CpuPerRequest() for path in LEDGER_PATHS})
    # The part of it outside the event loop's thread: with the ledger on, mostly the database's process.
    off_loop_cpu: dict[str, CpuPerRequest] = field(
        default_factory=lambda: {path: CpuPerRequest() for path in LEDGER_PATHS})

    def cpu_ms_per_request(self, path: str) -> float:
        return self.worker_cpu[path].ms()

    def off_loop_cpu_ms_per_request(self, path: str) -> float:
        return self.off_loop_cpu[path].ms()

    def costs(self, path: str = "ledger_on") -> list[float]:
        """Per round: 1 - tok/s with the ledger (as `path` runs it) / tok/s without."""
        on, off = self.paths[path].run_tok_s, self.paths["ledger_off"].run_tok_s
        return [1 - with_ledger / without for with_ledger, without in zip(on, off, strict=True) if without]


def compare_ledger(workers: dict[str, BenchWorker], load: LoadGenerator, concurrency: int, rounds: int,
                   scale: float) -> LedgerRow:
    num_prompts = SETUP.num_prompts(concurrency, scale)
    row = LedgerRow(SETUP.name, concurrency, num_prompts)
    for round_index in range(rounds):
        for path in rotated(LEDGER_PATHS, round_index):
            label = f"{SETUP.name}-c{concurrency}-{path}-r{round_index}"
            worker = workers[path]
            cpu_before, off_loop_before = worker.cpu_s(), worker.off_loop_cpu_s()
            result = load.run(worker.target, SETUP.model_id, concurrency, num_prompts, label)
            row.worker_cpu[path].add_run(worker.cpu_s() - cpu_before, num_prompts, concurrency)
            row.off_loop_cpu[path].add_run(worker.off_loop_cpu_s() - off_loop_before, num_prompts, concurrency)
            row.paths[path].add(result)
            logger.info("%s: %.0f output tok/s, failed %d", label, result["output_throughput"], result["failed"])
    return row


def render_report(rows: list[LedgerRow], shape: LoadShape, started: datetime.datetime,
                  load_averages: tuple[float, float], command: str) -> str:
    header = ("| engine | streams | ledger | requests per run | tok/s ledger off | tok/s ledger on | cost (pooled) | "
              "cost (paired median) | per-round cost, min .. max | rounds the ledger-on worker was faster | "
              "worker CPU ms per request, off / on | of which outside the event loop thread, off / on | "
              "TTFT p50 off | TTFT p50 on | failed off / on |")
    lines = table_head(header)
    for row in rows:
        off = row.paths["ledger_off"]
        for path, name in PATH_NAMES.items():
            on = row.paths[path]
            if not on.run_tok_s:
                continue
            pooled = 1 - on.output_tok_s / off.output_tok_s if off.output_tok_s else float("nan")
            costs = row.costs(path) or [float("nan")]
            lines.append(
                f"| {row.engine} | {row.concurrency} | {name} | {row.requests_per_run} | {fmt(off.output_tok_s)} | "
                f"{fmt(on.output_tok_s)} | {pct(pooled)} | {pct(float(np.median(costs)))} | "
                f"{pct(min(costs))} .. {pct(max(costs))} | {sum(cost < 0 for cost in costs)} of "
                f"{len(row.costs(path))} | "
                f"{fmt(row.cpu_ms_per_request('ledger_off'), 2)} / {fmt(row.cpu_ms_per_request(path), 2)} | "
                f"{fmt(row.off_loop_cpu_ms_per_request('ledger_off'), 3)} / "
                f"{fmt(row.off_loop_cpu_ms_per_request(path), 3)} | "
                f"{fmt(off.ttft(50), 1)} | {fmt(on.ttft(50), 1)} | {off.failed} / {on.failed} |"
            )
    return f"""# Ledger write path cost: the worker with the usage ledger on vs. off

Generated on {started:%Y-%m-%d %H:%M} UTC by `{command}`; rerun it to refresh this page.
Machine: {describe_machine()}; vLLM {vllm_version()}.
The load generator, the workers and the engines share these cores, so read the ratios, not the bare figures.

Three workers, each a real `worker serve --engine config` in front of its own engine ({SETUP.describe}),
identical but for the ledger; auth and admission control off in all. With the ledger on, every request is
recorded in SQLite (WAL, batched group commits off the event loop): with the default `synchronous=NORMAL` (a
record survives the worker being killed, not a power loss), the record is appended to the worker's journal
file before the last byte is sent and committed with the next {JOURNAL_FLUSH_S * 1000:g} ms of records; with
`WORKER_DB_SYNCHRONOUS=full`, each batch is also fsynced and a stream's last byte waits for its commit. With the ledger off, the billing hook is not installed
at all; provenance headers and `usage.cost` come from their own hook and are sent either way. Each worker first
serves one unrecorded run; then, at each concurrency, the same load goes to the three in turn, {shape.rounds}
rounds of one run each, each worker going first in turn.

Load: `vllm bench serve` (vLLM's own load generator, run in-process), backend `openai-chat`, streamed, random
prompts of {shape.input_len} tokens, {shape.output_len} output tokens each (`ignore_eos`), request rate unlimited
under a fixed number of concurrent streams; each run starts with as many warm-up requests as streams.
1-minute load average of the machine when the runs began and ended: {load_averages[0]:.1f} and {load_averages[1]:.1f}.

cost = 1 - (tok/s ledger on / tok/s ledger off): "pooled" over all runs of each worker, "paired median" = median
of the per-round costs. The per-round range, and the number of rounds in which the ledger-on worker was the
faster, show how far the cost stands out from the run-to-run noise. "worker CPU ms per request" = CPU time of the
worker (its process and, with the ledger on SQLite, the billing database's process; not the engine) over the
requests it served, warm-ups included; "outside the event loop thread" = the part of it spent outside the event
loop's thread (with the ledger on, mostly in the database's process): unlike the whole process's figure, it hardly moves with the machine's noise. The
ledger's work on the event loop (building the record, appending it to the journal or handing it to the writer,
hearing back when its batch has committed) is in the first figure only. The ledger's work is per request, the relay's mostly per streamed token: the ledger's share depends on
the length of the responses ({shape.output_len} tokens here).

{chr(10).join(lines)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30, help="runs per worker at each concurrency")
    parser.add_argument("--scale", type=float, default=8.0,
                        help="requests per run: this many times 6 per stream (at least 24); a cost of a few "
                             "percent must stand out of the run-to-run noise")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks-ledger.md"))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()

    started = datetime.datetime.now(datetime.UTC)
    shape = LoadShape(args.input_len, args.output_len, args.rounds, args.scale)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    result_dir = args.result_dir or work_dir / "results"
    result_dir.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(work_dir / "tiny-llama")  # the load generator's tokenizer
    load = LoadGenerator(model_dir, shape, result_dir, work_dir / "load-generator.log")

    rows = []
    with contextlib.ExitStack() as stack:
        workers = {path: stack.enter_context(running_worker(SETUP, model_dir, work_dir / path, auth=False,
                                                            admission=False, ledger=PATH_SETTINGS[path][0],
                                                            synchronous=PATH_SETTINGS[path][1]))
                   for path in LEDGER_PATHS}
        for path, worker in workers.items():
            first = args.concurrency[0]
            load.run(worker.target, SETUP.model_id, first, SETUP.num_prompts(first, 1.0), f"warm-up-{path}")
        load_before = os.getloadavg()[0]
        for concurrency in args.concurrency:
            rows.append(compare_ledger(workers, load, concurrency, args.rounds, args.scale))
        load_averages = (load_before, os.getloadavg()[0])

    command = command_line("bench.ledger", argv)
    report = render_report(rows, shape, started, load_averages, command)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(report)
    (result_dir / "summary.json").write_text(json.dumps(
        [{"engine": r.engine, "concurrency": r.concurrency, "ledger_costs": r.costs(),
          **{f"{p}_worker_cpu_ms_per_request": r.cpu_ms_per_request(p) for p in LEDGER_PATHS},
          **{f"{p}_off_loop_cpu_ms_per_request": r.off_loop_cpu_ms_per_request(p) for p in LEDGER_PATHS},
          **{f"{p}_{k}": v for p in LEDGER_PATHS for k, v in r.paths[p].summary().items()}} for r in rows],
        indent=2))
    print(report)
    logger.info("wrote %s; per-run results in %s", args.doc, result_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
