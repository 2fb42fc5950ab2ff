"""Before and after a change, side by side: the same streamed load through workers built from two source trees.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.trees --before /tmp/before [--concurrency 32] [--rounds 8]
                                    [--doc docs/benchmarks-before-after.md]

Six real `worker serve --engine config` processes, each in front of its own zero-cost mock engine (where the
engine costs nothing, the worker is the bottleneck and its own cost shows): the tree given by --before and
this checkout, each as production runs it (auth on with a key issued by that tree's `worker keys`, SQLite
ledger), with the ledger alone (auth off, as bench.ledger measures it) and with both off; admission at the
model's defaults in all. The same load (`vllm bench serve`, in-process) goes to the six in turn, each going
first in turn.

Reported per tree: output tok/s, TTFT p50, the worker's CPU per request (its process, its billing database's
process and gateway processes, not the engine) and the database process's part of it, and the ledger's cost
(1 - tok/s ledger alone / tok/s both off, median of the per-round ratios). The CPU ratio after / before is
given pooled and as the median of the per-round ratios (each round runs every worker once, so a change in
what else the machine runs within a round moves both trees alike).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import subprocess
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
    command_line,
    configure_logging,
    describe_machine,
    fmt,
    pct,
    rotated,
    running_worker,
    table_head,
)
from tests.fixtures.tiny_model import make_tiny_model

logger = logging.getLogger("bench.trees")

SETUP = ENGINES["mock"]
REPO = Path(__file__).resolve().parents[1]
# tree/setting: "production" = auth and ledger on; "ledger" = the ledger on, auth off (as bench.ledger);
# "off" = both off.
PATHS = ("before/production", "after/production", "before/ledger", "after/ledger", "before/off", "after/off")


@dataclass
class Measured:
    samples: PathSamples = field(default_factory=PathSamples)
    cpu: CpuPerRequest = field(default_factory=CpuPerRequest)
    database_cpu: CpuPerRequest = field(default_factory=CpuPerRequest)  # the part of `cpu` in the database process


def tree_commit(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True, check=False)
    line = result.stdout.strip()
    return line if len(line) <= 90 else line[:87] + "..."


def ledger_cost(on: PathSamples, off: PathSamples) -> float:
    costs = [1 - with_ledger / without for with_ledger, without in zip(on.run_tok_s, off.run_tok_s, strict=False)
             if without]
    return float(np.median(costs)) if costs else float("nan")


def paired_cpu_ratio(after: CpuPerRequest, before: CpuPerRequest) -> float:
    """Median over rounds of the CPU-per-request ratio within one round."""
    ratios = [a / b for a, b in zip(after.run_ms, before.run_ms, strict=True) if b]
    return float(np.median(ratios)) if ratios else float("nan")


def run(before: Path, work_dir: Path, concurrency: int, rounds: int, scale: float) -> dict[str, Measured]:
    shape = LoadShape(input_len=128, output_len=128, rounds=rounds, scale=scale)
    model_dir = make_tiny_model(work_dir / "model")
    load = LoadGenerator(model_dir, shape, work_dir / "results", work_dir / "load.log")
    trees = {"before": before, "after": None}
    measured = {path: Measured() for path in PATHS}
    with contextlib.ExitStack() as stack:
        workers: dict[str, BenchWorker] = {}
        for path in PATHS:
            tree, setting = path.split("/")
            workers[path] = stack.enter_context(running_worker(
                SETUP, model_dir, work_dir / path.replace("/", "-"), auth=setting == "production", admission=True,
                ledger=setting != "off", source_tree=trees[tree]))
        num_prompts = SETUP.num_prompts(concurrency, scale)
        for path, worker in workers.items():  # one unrecorded run each: connection pools, caches, JIT-free warm-up
            load.run(worker.target, SETUP.model_id, concurrency, num_prompts, f"warmup-{path.replace('/', '-')}")
        for round_index in range(rounds):
            for path in rotated(PATHS, round_index):
                worker = workers[path]
                cpu_before, database_before = worker.cpu_s(), worker.database_cpu_s()
                label = f"c{concurrency}-{path.replace('/', '-')}-r{round_index}"
                result = load.run(worker.target, SETUP.model_id, concurrency, num_prompts, label)
                measured[path].cpu.add_run(worker.cpu_s() - cpu_before, num_prompts, concurrency)
                measured[path].database_cpu.add_run(worker.database_cpu_s() - database_before, num_prompts,
                                                    concurrency)
                measured[path].samples.add(result)
                logger.info("%s: %.0f output tok/s, failed %d", label, result["output_throughput"], result["failed"])
    return measured


def report(measured: dict[str, Measured], before: Path, concurrency: int, rounds: int, scale: float,
           started: datetime.datetime, command: str) -> str:
    lines = table_head("| tree | auth, ledger | output tok/s | TTFT p50 ms | worker CPU ms per request "
                       "| of which database process | failed |")
    names = {"production": "on, on", "ledger": "off, on", "off": "off, off"}
    for path in PATHS:
        tree, setting = path.split("/")
        m = measured[path]
        lines.append(f"| {tree} | {names[setting]} | {fmt(m.samples.output_tok_s)} | {fmt(m.samples.ttft(50), 1)} "
                     f"| {fmt(m.cpu.ms(), 2)} | {fmt(m.database_cpu.ms(), 3)} | {m.samples.failed} |")
    cpu_ratio = measured["after/production"].cpu.ms() / measured["before/production"].cpu.ms()
    cpu_paired = paired_cpu_ratio(measured["after/production"].cpu, measured["before/production"].cpu)
    tok_ratio = measured["after/production"].samples.output_tok_s / measured["before/production"].samples.output_tok_s
    costs = {tree: ledger_cost(measured[f"{tree}/ledger"].samples, measured[f"{tree}/off"].samples)
             for tree in ("before", "after")}
    return f"""# Before and after: the worker's cost per request from two source trees, side by side

Generated on {started:%Y-%m-%d %H:%M} UTC by `{command}`; machine: {describe_machine()}.
The load generator, the six workers and their engines share these cores, and other work (tests) ran on the
machine at the same time: the absolute figures move from round to round; read the side-by-side ratios.

- before: `{tree_commit(before)}`
- after: `{tree_commit(REPO)}`

Six workers, each in front of its own engine ({SETUP.describe}), admission at its defaults in all: each tree
as production runs it (auth on with a key issued by that tree's `worker keys`, SQLite ledger), with the ledger
alone (auth off, as bench.ledger measures it), and with both off. Load: `vllm bench serve`, streamed chat,
{concurrency} concurrent streams, 128 prompt / 128 output tokens, {SETUP.num_prompts(concurrency, scale)}
requests per run, {rounds} rounds, the six workers in turn, each going first in turn, after one unrecorded
run each. Worker CPU = its process, its billing database's process and gateway processes (not the engine)
over the requests it served, warm-ups included.

{chr(10).join(lines)}

- Worker CPU per request as production runs it, after / before: **{cpu_ratio:.2f}x** pooled,
  **{cpu_paired:.2f}x** as the median of the per-round ratios; output tok/s after / before: **{tok_ratio:.2f}x**.
- Ledger cost (1 - tok/s ledger alone / both off, median of per-round ratios): before {pct(costs['before'])},
  after {pct(costs['after'])}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", type=Path, required=True, help="a source tree, e.g. a git worktree of a commit")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0, help="multiplies the number of requests per run")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks-before-after.md")
    parser.add_argument("--work-dir", type=Path, help="logs and results (default: a new temp dir, kept)")
    args = parser.parse_args(argv)
    configure_logging()
    if not (args.before / "worker" / "__init__.py").is_file():
        parser.error(f"--before {args.before}: not a source tree of this project (no worker/__init__.py)")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="trees-bench-"))
    started = datetime.datetime.now(datetime.UTC)
    measured = run(args.before.resolve(), work_dir, args.concurrency, args.rounds, args.scale)
    args.doc.write_text(report(measured, args.before.resolve(), args.concurrency, args.rounds, args.scale, started,
                               command_line("bench.trees", argv)))
    (work_dir / "summary.json").write_text(json.dumps(
        {path: {**m.samples.summary(), "worker_cpu_ms_per_request": m.cpu.ms(),
                "database_cpu_ms_per_request": m.database_cpu.ms(), "worker_cpu_ms_per_run": m.cpu.run_ms}
         for path, m in measured.items()},
        indent=2))
    print(f"wrote {args.doc} (work files in {work_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
