"""The gateway benchmark's results and how they are shown: the Markdown page and the PNG plot."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    CpuPerRequest,
    EngineSetup,
    LoadShape,
    PathSamples,
    describe_machine,
    fmt,
    package_version,
    paired_ratio,
    pooled_ratio,
    table_head,
    vllm_version,
)

PATHS = ("direct", "worker", "litellm")
PATH_NAMES = {"direct": "direct", "worker": "worker", "litellm": "LiteLLM"}
GATEWAYS = ("worker", "litellm")


@dataclass(frozen=True)
class Plan:
    concurrencies: list[int]
    shape: LoadShape
    # LiteLLM's requests per run relative to the other paths'.
    litellm_share: float
    # The command that produced the report, as a reader reruns it.
    command: str


@dataclass
class GatewayRow:
    engine: str
    concurrency: int
    paths: dict[str, PathSamples] = field(default_factory=lambda: {path: PathSamples() for path in PATHS})
    # CPU time of each gateway process (not of the engine) and the requests it served, warm-ups included.
    gateway_cpu: dict[str, CpuPerRequest] = field(
        default_factory=lambda: {path: CpuPerRequest() for path in GATEWAYS})

    def cpu_ms_per_request(self, path: str) -> float:
        return self.gateway_cpu[path].ms() if path in self.gateway_cpu else float("nan")

    def ratio_to_direct(self, path: str) -> float:
        return pooled_ratio(self.paths[path], self.paths["direct"])

    def added_ttft_p50(self, path: str) -> float:
        return self.paths[path].ttft(50) - self.paths["direct"].ttft(50)


@dataclass
class EngineRun:
    setup: EngineSetup
    rows: list[GatewayRow]
    # 1-minute load average of the machine when the engine's runs began and ended.
    load_averages: tuple[float, float]


@dataclass(frozen=True)
class Goal:
    text: str
    engine: str
    concurrency: int
    measure: str  # "worker/direct", "worker/litellm" or "added_ttft"
    target: float

    def measured(self, row: GatewayRow) -> tuple[tuple[float, ...], str]:
        """The values the goal is judged on (pooled and paired, for a ratio), and how they read."""
        if self.measure == "added_ttft":
            value = row.added_ttft_p50("worker")
            return (value,), f"{fmt(value, 2)} ms"
        other = "direct" if self.measure == "worker/direct" else "litellm"
        pooled = pooled_ratio(row.paths["worker"], row.paths[other])
        paired = paired_ratio(row.paths["worker"], row.paths[other])
        digits, unit = (3, "") if other == "direct" else (1, "x")
        return (pooled, paired), f"{fmt(pooled, digits)}{unit} (paired {fmt(paired, digits)}{unit})"

    def met(self, values: tuple[float, ...]) -> bool:
        """Met only when every reading of it is: a pooled ratio that a lucky round lifted does not count."""
        if any(math.isnan(value) for value in values):
            return False
        if self.measure == "added_ttft":
            return all(value <= self.target for value in values)
        return all(value >= self.target for value in values)


def goals(concurrencies: list[int]) -> list[Goal]:
    listed = [
        Goal("worker reaches >= 0.90 of direct output tok/s", "mock", 32, "worker/direct", 0.90),
        Goal("worker reaches >= 12x LiteLLM's output tok/s", "mock", 32, "worker/litellm", 12.0),
        Goal("single-stream median TTFT adds <= 1 ms over direct", "mock", 1, "added_ttft", 1.0),
    ]
    listed += [Goal("worker within 3% of direct output tok/s", "vllm", c, "worker/direct", 0.97)
               for c in concurrencies]
    return listed


def render_goals(runs: list[EngineRun]) -> str:
    rows = {(row.engine, row.concurrency): row for run in runs for row in run.rows}
    concurrencies = sorted({concurrency for _, concurrency in rows})
    lines = table_head("| engine | streams | goal | measured | met |")
    for goal in goals(concurrencies):
        row = rows.get((goal.engine, goal.concurrency))
        if row is None:
            continue
        values, shown = goal.measured(row)
        lines.append(f"| {goal.engine} | {goal.concurrency} | {goal.text} | {shown} | "
                     f"{'yes' if goal.met(values) else '**no**'} |")
    return "\n".join(lines) if len(lines) > 2 else "(no run covers a goal's engine and concurrency)"


def render_summary(runs: list[EngineRun]) -> str:
    header = ("| engine | streams | worker / direct tok/s | worker / direct, paired | LiteLLM / direct tok/s "
              "| worker / LiteLLM tok/s | worker / LiteLLM, paired | added TTFT p50 worker | added TTFT p50 LiteLLM "
              "| failed direct / worker / LiteLLM |")
    lines = table_head(header)
    for run in runs:
        for row in run.rows:
            direct, worker, litellm = (row.paths[path] for path in PATHS)
            lines.append(
                f"| {row.engine} | {row.concurrency} | {fmt(row.ratio_to_direct('worker'), 3)} | "
                f"{fmt(paired_ratio(worker, direct), 3)} | {fmt(row.ratio_to_direct('litellm'), 3)} | "
                f"{fmt(pooled_ratio(worker, litellm), 1)} | {fmt(paired_ratio(worker, litellm), 1)} | "
                f"{fmt(row.added_ttft_p50('worker'), 2)} | {fmt(row.added_ttft_p50('litellm'), 2)} | "
                f"{direct.failed} / {worker.failed} / {litellm.failed} |"
            )
    return "\n".join(lines)


def render_details(runs: list[EngineRun]) -> str:
    header = ("| engine | streams | path | requests per run | output tokens per request | output tok/s | requests/s "
              "| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | tok/s / direct | added TTFT p50 | gateway CPU ms per request "
              "| failed |")
    lines = table_head(header)
    for run in runs:
        for row in run.rows:
            for path in PATHS:
                samples = row.paths[path]
                direct = path == "direct"
                lines.append(
                    f"| {row.engine} | {row.concurrency} | {PATH_NAMES[path]} | "
                    f"{samples.run_prompts[0] if samples.run_prompts else 0} | {fmt(samples.tokens_per_request, 1)} | "
                    f"{fmt(samples.output_tok_s)} | {fmt(samples.requests_s, 1)} | {fmt(samples.ttft(50), 1)} | "
                    f"{fmt(samples.ttft(99), 1)} | {fmt(samples.itl(50), 2)} | {fmt(samples.itl(99), 2)} | "
                    f"{'1' if direct else fmt(row.ratio_to_direct(path), 3)} | "
                    f"{'0' if direct else fmt(row.added_ttft_p50(path), 2)} | "
                    f"{'n/a' if direct else fmt(row.cpu_ms_per_request(path), 2)} | {samples.failed} |"
                )
    return "\n".join(lines)


def render_report(runs: list[EngineRun], plan: Plan, started: datetime.datetime, elapsed_s: float,
                  plot_link: str) -> str:
    shape = plan.shape
    engines = "\n".join(
        f"- `{run.setup.name}`: {run.setup.describe}. Requests per run (direct and worker / LiteLLM): "
        + ", ".join(f"{_requests(row, 'direct')} / {_requests(row, 'litellm')} at {row.concurrency} "
                    f"stream{'s' if row.concurrency != 1 else ''}" for row in run.rows)
        + ". 1-minute load average of the machine when its runs began and ended: "
        + " and ".join(f"{value:.1f}" for value in run.load_averages) + "."
        for run in runs)
    return f"""# Gateway benchmark: the worker vs. direct engine access vs. LiteLLM's proxy

Generated on {started:%Y-%m-%d %H:%M} UTC in {elapsed_s / 60:.1f} minutes by the command below, in the virtualenv that
`bash tests/run.sh` sets up (vLLM on the CPU); it rewrites this page and [the plot]({plot_link}):

```
{plan.command}
```

- Machine: {describe_machine()}.
  The load generator, the gateways and the engine share these cores, so read the ratios between paths
  measured side by side, not the bare figures.
- Versions: vLLM {vllm_version()}, LiteLLM {package_version("litellm")}, worker {package_version("worker")}.
- Load: `vllm bench serve` (vLLM's own load generator, run in-process), backend `openai-chat`, streamed chat
  completions with `stream_options.include_usage`, random prompts of {shape.input_len} tokens, {shape.output_len}
  output tokens each (`ignore_eos`), request rate unlimited under a fixed number of concurrent streams
  ({", ".join(str(c) for c in plan.concurrencies)}); each run starts with as many warm-up requests as streams.
  {shape.rounds} runs per path and concurrency, pooled; within a round the three paths run one after the other,
  each going first in turn.
- LiteLLM's runs carry {plan.litellm_share:.0%} of the other paths' requests (at least one per stream): at a few
  percent of direct throughput on the mock, full-size runs would make the benchmark last far longer on this
  machine. Its figures therefore come from fewer requests, and its p99s are the least certain numbers here.

Paths, all to the same engine process:

- **direct**: the engine's own OpenAI-compatible loopback port (the replica the worker supervises).
- **worker**: `worker serve --engine config`, one process, with what a production node runs on every request:
  auth on (an API key issued by `worker keys` on an account with a large balance), admission control at the
  model's defaults (derived from `max_num_seqs` 256, so 128 streams are admitted), the usage ledger on SQLite
  (default `synchronous=NORMAL`), Prometheus metrics.
- **LiteLLM**: LiteLLM's proxy server (`litellm --config ...`, one uvicorn process as shipped) with a master key and
  no database (so no virtual keys or spend logs), model `openai/<model>` at the engine's `/v1`.

Engines:

{engines}

Definitions (vLLM's): output tok/s = output tokens / run duration, pooled over runs; requests/s = completed
requests / run duration; TTFT = time to the first streamed token; ITL = every gap between streamed chunks, pooled
over requests; p50/p99 over all successful requests of all runs; times in ms. "X / direct" = pooled tok/s of X
over pooled tok/s of direct; "paired" = median over rounds of the same ratio within one round (less sensitive to
bursts of load from other processes). "added TTFT p50" = the path's TTFT p50 - direct's. "gateway CPU ms per
request" = CPU time of the worker or LiteLLM process (not the engine) during its runs over the requests it
served, warm-ups included; it also holds the process's background work in that time (the worker's engine
scrapes and health checks), which dominates where requests are few and slow (vLLM at 1 stream). "failed" =
requests that got no stream (an error status, such as admission's 429, or a broken stream). An ITL p50 near 0
means chunks arrived in bursts, several events per network read.

![Output tokens/s and median TTFT per path and concurrency]({plot_link})

## Ratios

{render_summary(runs)}

## Goals

Measured in this run; "paired" as defined above.

{render_goals(runs)}

On this machine every path's load generator, gateway and engine share 2 cores, and at 8 or more streams the
cores are saturated, so a path's throughput is set by the CPU its processes spend per request, the gateway's
included: the ratio to direct is the engine's and the load generator's CPU per request over theirs plus the
gateway's ("gateway CPU ms per request" above). How the worker's hot path is built, how it was profiled and
where the time went before each change: [hot-path.md](hot-path.md).

## All figures

{render_details(runs)}
"""


def _requests(row: GatewayRow, path: str) -> int:
    prompts = row.paths[path].run_prompts
    return prompts[0] if prompts else 0


def render_plot(runs: list[EngineRun], path: Path) -> None:
    """Output tok/s (top) and TTFT p50 (bottom) against concurrency, one line per path, one column per engine."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, axes = plt.subplots(2, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 8), squeeze=False)
    for column, run in enumerate(runs):
        concurrencies = [row.concurrency for row in run.rows]
        throughput, ttft = axes[0][column], axes[1][column]
        for name in PATHS:
            samples = [row.paths[name] for row in run.rows]
            throughput.plot(concurrencies, [s.output_tok_s for s in samples], marker="o", label=PATH_NAMES[name])
            ttft.plot(concurrencies, [s.ttft(50) for s in samples], marker="o", label=PATH_NAMES[name])
        throughput.set_title(f"{run.setup.name}: output tokens/s")
        ttft.set_title(f"{run.setup.name}: TTFT p50 (ms)")
        for axis in (throughput, ttft):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axis.set_xlabel("concurrent streams")
            axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.yaxis.set_major_formatter(FuncFormatter(_plain_number))
            axis.yaxis.set_minor_formatter(NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plain_number(value: float, _position: object) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:.2g}"
