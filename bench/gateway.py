"""The gateway benchmark: the same streamed load straight to the engine, through the worker, and through LiteLLM.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python -m bench.gateway
        [--engines mock vllm] [--concurrency 1 8 32 128] [--rounds 5] [--litellm-share 0.25]
        [--doc docs/benchmarks.md] [--plot docs/benchmarks.png]

For each engine a real `worker serve --engine config` process starts one replica, with everything a
production node runs on the hot path: API keys (auth on; the load carries a key issued by `worker keys`
on an account with a large balance), admission control at the model's defaults, the usage ledger on
SQLite, metrics. Beside it, LiteLLM's proxy server fronts the same engine process. At each concurrency
`vllm bench serve` sends the same load to the engine's own port ("direct"), the worker ("worker") and
LiteLLM ("litellm"), run after run, each path going first in turn, so all three see the same engine and
the same machine load. LiteLLM is far slower than the other two, so its runs carry a share of their
requests (--litellm-share) to keep the whole benchmark near 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    ENGINES,
    EngineSetup,
    LoadGenerator,
    LoadShape,
    add_output_arguments,
    command_line,
    configure_logging,
    rotated,
    running_worker,
)
from bench.gateway_report import PATHS, EngineRun, GatewayRow, Plan, render_plot, render_report
from bench.litellm_proxy import running_litellm_proxy
from tests.fixtures.tiny_model import make_tiny_model

logger = logging.getLogger("bench.gateway")

INSTALL_COMMAND = ".venv/bin/pip install -e '.[bench]'"


def litellm_prompts(setup: EngineSetup, concurrency: int, plan: Plan) -> int:
    """LiteLLM's requests per run: a share of the others', but at least one per stream."""
    return max(concurrency, round(plan.litellm_share * setup.num_prompts(concurrency, plan.shape.scale)))


def bench_engine(setup: EngineSetup, model_dir: Path, work_dir: Path, load: LoadGenerator, plan: Plan) -> EngineRun:
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(running_worker(setup, model_dir, work_dir / "worker", auth=True,
                                                    admission=True, ledger=True))
        engine = worker.engine_target(setup.model_id)
        proxy = stack.enter_context(running_litellm_proxy(setup.model_id, engine, work_dir / "litellm"))
        targets = {"direct": engine, "worker": worker.target, "litellm": proxy.target}
        gateway_cpu_s = {"worker": worker.cpu_s, "litellm": proxy.cpu_s}
        load_before = os.getloadavg()[0]
        rows = []
        for concurrency in plan.concurrencies:
            row = GatewayRow(setup.name, concurrency)
            for round_index in range(plan.shape.rounds):
                for path in rotated(PATHS, round_index):
                    num_prompts = (litellm_prompts(setup, concurrency, plan) if path == "litellm"
                                   else setup.num_prompts(concurrency, plan.shape.scale))
                    label = f"{setup.name}-c{concurrency}-{path}-r{round_index}"
                    cpu_before = gateway_cpu_s[path]() if path in gateway_cpu_s else 0.0
                    result = load.run(targets[path], setup.model_id, concurrency, num_prompts, label)
                    if path in gateway_cpu_s:
                        row.gateway_cpu[path].add_run(gateway_cpu_s[path]() - cpu_before, num_prompts, concurrency)
                    row.paths[path].add(result)
                    logger.info("%s: %.0f output tok/s, median TTFT %.1f ms, failed %d", label,
                                result["output_throughput"], result["median_ttft_ms"], result["failed"])
            rows.append(row)
        return EngineRun(setup, rows, (load_before, os.getloadavg()[0]))


@dataclass(frozen=True)
class Outputs:
    doc: Path
    plot: Path
    result_dir: Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=["mock", "vllm"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per path at each concurrency")
    parser.add_argument("--litellm-share", type=float, default=0.25,
                        help="LiteLLM's requests per run relative to the other paths' (at least one per stream)")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/benchmarks.png"))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()

    started = datetime.datetime.now(datetime.UTC)
    started_s = time.monotonic()
    plan = Plan(
        concurrencies=args.concurrency,
        shape=LoadShape(args.input_len, args.output_len, args.rounds, args.scale),
        litellm_share=args.litellm_share,
        command=f"{INSTALL_COMMAND} && {command_line('bench.gateway', argv)}",
    )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(args.doc, args.plot, args.result_dir or work_dir / "results")
    outputs.result_dir.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(work_dir / "tiny-llama")
    load = LoadGenerator(model_dir, plan.shape, outputs.result_dir, work_dir / "load-generator.log")

    runs = []
    for name in args.engines:
        setup = ENGINES[name]
        logger.info("starting the worker and LiteLLM's proxy with the %s engine (logs in %s)", name, work_dir / name)
        runs.append(bench_engine(setup, model_dir, work_dir / name, load, plan))

    elapsed_s = time.monotonic() - started_s
    outputs.doc.parent.mkdir(parents=True, exist_ok=True)
    outputs.plot.parent.mkdir(parents=True, exist_ok=True)
    render_plot(runs, outputs.plot)
    report = render_report(runs, plan, started, elapsed_s, plot_link=os.path.relpath(outputs.plot, outputs.doc.parent))
    outputs.doc.write_text(report)
    (outputs.result_dir / "summary.json").write_text(json.dumps(
        [{"engine": row.engine, "concurrency": row.concurrency,
          **{f"{path}_{key}": value for path in PATHS for key, value in row.paths[path].summary().items()}}
         for run in runs for row in run.rows], indent=2))
    print(report)
    logger.info("wrote %s and %s; per-run results in %s", outputs.doc, outputs.plot, outputs.result_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
