"""Scheduler benchmark on real vLLM-CPU engines: the placement policies side by side, 2 replicas of a random
Llama made large enough that prefill takes the engine measurable time, prefix caching on.

    .venv/bin/python -m bench.scheduler_vllm [--quick] [--doc docs/benchmarks-scheduler-vllm.md]
    .venv/bin/python -m bench.scheduler_vllm --render WORK_DIR/summary.json   # the page again, from a run's figures

The same multi-turn shared-prefix workload and phases as `bench.scheduler` (saturation, 0.8x of
least_loaded's completed turns/s, no shared prefix), one `worker serve` per policy (least_loaded first,
round_robin, cache_aware). Each replica's KV cache is capped (`num_gpu_blocks_override`) so that it holds
about half of the tenants' prompts: where a session lands decides whether its prefix is cached. The
prefix-cache hit rate is vLLM's own (`vllm:prefix_cache_hits_total` / `_queries_total`, both replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import command_line, describe_machine, fmt
from bench.scheduler import (
    CACHE_AWARE,
    LEAST_LOADED,
    MODEL,
    Phase,
    Tenants,
    Workload,
    by,
    measure_policy,
    plot,
    results_table,
    serving,
)
from tests.fixtures.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 900.0
POLICIES = (LEAST_LOADED, "round_robin", CACHE_AWARE)


@dataclass(frozen=True)
class PhaseFigures:
    """One phase's figures as a run's summary.json keeps them (what the page and the plot read)."""

    policy: str
    name: str
    requests: int
    output_tok_s: float
    turns_per_s: float
    ttft_ms_by_percentile: dict[int, float]
    hit_rate: float
    refused: int
    failed: int
    cpu_ms_per_request: float

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> PhaseFigures:
        return cls(summary["policy"], summary["phase"], summary["requests"], summary["output_tok_s"],
                   summary["turns_per_s"], {q: summary[f"ttft_p{q}_ms"] for q in (50, 90, 99)},
                   summary["prefix_cache_hit_rate"], summary["refused"], summary["failed"],
                   summary["worker_cpu_ms_per_request"])

    def ttft_ms(self, q: int) -> float:
        return self.ttft_ms_by_percentile[q]


@dataclass(frozen=True)
class VllmSetup:
    replicas: int = 2
    max_num_seqs: int = 4
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_attention_heads: int = 4
    block_size: int = 128  # vLLM's CPU backend
    num_gpu_blocks: int = 40
    max_model_len: int = 2048


SETUP = VllmSetup()
# As many closed-loop users as the replicas have batch slots: this engine on 2 shared cores is slow enough that
# a queue beyond them would wait past the first-token objective.
WORKLOAD = Workload(tenants=8, system_words=200, turns=4, user_words=10, output_tokens=16, users=8,
                    duration_s=60.0, warmup_s=15.0, pause_s=3.0)
QUICK_SETUP = VllmSetup(hidden_size=128, intermediate_size=256, num_layers=2, num_attention_heads=2)
QUICK_WORKLOAD = Workload(tenants=4, system_words=100, turns=3, user_words=5, output_tokens=4, users=4,
                          duration_s=8.0, warmup_s=2.0, pause_s=1.0)


def vllm_model(setup: VllmSetup, model_dir: Path, policy: str) -> dict[str, Any]:
    return {
        "id": MODEL, "engine": "vllm", "source": str(model_dir), "replicas": setup.replicas,
        "engine_args": {"dtype": "bfloat16", "max_model_len": setup.max_model_len, "enforce_eager": True,
                        "max_num_seqs": setup.max_num_seqs, "enable_prefix_caching": True,
                        "block_size": setup.block_size, "num_gpu_blocks_override": setup.num_gpu_blocks},
        "pricing": {"prompt_per_mtok": "0", "completion_per_mtok": "0"},
        "routing": {"policy": policy},
    }


async def policy_runs(setup: VllmSetup, workload: Workload, model_dir: Path, work_dir: Path) -> list[Phase]:
    tenants = Tenants.make(workload)
    phases: list[Phase] = []
    capacity_turns_s = 0.0
    # No idle probes: their one-token requests would move the prefix-cache counters.
    settings = {"engine_start_timeout_s": START_TIMEOUT_S, "engine_health": {"probe_interval_s": None}}
    for number, policy in enumerate(POLICIES):
        async with serving(work_dir / f"policy-{number}", vllm_model(setup, model_dir, policy), engine="config",
                           start_timeout_s=START_TIMEOUT_S, worker_settings=settings) as worker, \
                aiohttp.ClientSession(worker.base_url, timeout=aiohttp.ClientTimeout(total=900),
                                      connector=aiohttp.TCPConnector(limit=0)) as client:
            policy_phases = await measure_policy(client, worker, policy, tenants, workload, capacity_turns_s)
            if policy == LEAST_LOADED:
                capacity_turns_s = policy_phases[0].turns_per_s
            phases += policy_phases
    return phases


def page(phases: list[PhaseFigures], setup: VllmSetup, workload: Workload, plot_name: str, vllm_version: str,
         argv: list[str] | None) -> str:
    lines = [
        "# Scheduler benchmark on vLLM-CPU: placement policies and the replicas' prefix caches", "",
        (f"Generated by `{command_line('bench.scheduler_vllm', argv)}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
         f"{describe_machine()}, vLLM {vllm_version} (CPU backend). The load generator, the worker and both "
         "engines share these cores: compare the policies with each other rather than reading absolute "
         "figures. The mock-engine half, with the goals, is [benchmarks-scheduler.md](benchmarks-scheduler.md)."),
        "",
        "## Setup", "",
        (f"{setup.replicas} replicas of a random-weight Llama made locally (hidden size {setup.hidden_size}, "
         f"{setup.num_layers} layers, MLP {setup.intermediate_size}, {setup.num_attention_heads} heads, the "
         "test suite's byte-level BPE tokenizer with 512 tokens), bfloat16, `enforce_eager`, "
         f"`max_num_seqs` {setup.max_num_seqs}, prefix caching on, each replica's KV cache capped at "
         f"{setup.num_gpu_blocks} blocks of {setup.block_size} tokens "
         f"({setup.num_gpu_blocks * setup.block_size:,} tokens). Admission defaults."), "",
        (f"Workload: {workload.tenants} tenants, each with a system prompt of {workload.system_words} words "
         f"(~3 tokens a word with this tokenizer); a session is {workload.turns} turns of a "
         f"{workload.user_words}-word user message, each answer ({workload.output_tokens} tokens, streamed) "
         f"appended to the history the next turn sends. Phases of {workload.duration_s:g} s, the first "
         f"{workload.warmup_s:g} s left out: *saturation* ({workload.users} closed-loop users), *0.8x* (sessions "
         "as a Poisson process at 0.8x least_loaded's completed turns/s at saturation), *no shared prefix* "
         f"({workload.users} closed-loop users, each request a prompt of its own). Definitions as on the mock "
         "page; the hit rate is vLLM's own counters."), "",
        "## Results", "",
        *results_table(phases),
    ]
    lines += ["", f"![Output tok/s and p90 TTFT per policy]({plot_name})", "", "## Ratios", ""]
    for name in ("saturation", "0.8x", "no shared prefix"):
        cache, load = by(phases, CACHE_AWARE, name), by(phases, LEAST_LOADED, name)
        tok = cache.output_tok_s / load.output_tok_s if load.output_tok_s else float("nan")
        ttft = load.ttft_ms(90) / cache.ttft_ms(90) if cache.ttft_ms(90) else float("nan")
        lines.append(f"- {name}: cache_aware vs least_loaded output tok/s **{tok:.2f}x**, p90 TTFT "
                     f"**{ttft:.2f}x lower** ({fmt(load.ttft_ms(90))} vs {fmt(cache.ttft_ms(90))} ms), hit rate "
                     f"{fmt(cache.hit_rate, 2)} vs {fmt(load.hit_rate, 2)}.")
    control = [by(phases, policy, "no shared prefix").output_tok_s for policy in POLICIES]
    spread = max(control) / min(control) if min(control) else float("nan")
    lines += ["", "## Reading the results", "",
              ("In the *no shared prefix* phase placement cannot matter (no prompt shares a prefix with another), so "
               "its spread between the policies is this run's noise: the fastest policy there did "
               f"{spread:.2f}x the slowest. Differences between policies smaller than that in the other phases "
               "are not separated from the machine's noise by this run; each policy's phases ran minutes apart on "
               "two cores shared with other work, and vLLM's compute on the CPU is what that sharing slows most."),
              ""]
    return "\n".join(lines)


async def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    import vllm

    setup, workload = (QUICK_SETUP, QUICK_WORKLOAD) if args.quick else (SETUP, WORKLOAD)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="scheduler-vllm-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = await asyncio.to_thread(
        make_tiny_model, work_dir / "model", hidden_size=setup.hidden_size,
        intermediate_size=setup.intermediate_size, num_layers=setup.num_layers,
        num_attention_heads=setup.num_attention_heads)
    phases = await policy_runs(setup, workload, model_dir, work_dir)
    summary = work_dir / "summary.json"
    summary.write_text(json.dumps([p.summary() for p in phases], indent=2))
    render(summary, setup, workload, args.doc, vllm.__version__, argv)
    print(f"wrote {args.doc} (work files in {work_dir})")


def render(summary: Path, setup: VllmSetup, workload: Workload, doc: Path, vllm_version: str,
           argv: list[str] | None) -> None:
    phases = [PhaseFigures.from_summary(item) for item in json.loads(summary.read_text())]
    doc.parent.mkdir(parents=True, exist_ok=True)
    plot_path = doc.with_suffix(".png")
    plot(phases, plot_path)
    doc.write_text(page(phases, setup, workload, plot_path.name, vllm_version, argv))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small run for a smoke test")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks-scheduler-vllm.md",
                        help="the page to write; the plot goes next to it (.png)")
    parser.add_argument("--work-dir", type=Path, help="logs (default: a new temp dir, kept)")
    parser.add_argument("--render", type=Path, metavar="SUMMARY_JSON",
                        help="write the page from an earlier run's summary.json instead of running")
    args = parser.parse_args(argv)
    if args.render is not None:
        import vllm

        setup, workload = (QUICK_SETUP, QUICK_WORKLOAD) if args.quick else (SETUP, WORKLOAD)
        render(args.render, setup, workload, args.doc, vllm.__version__, None)
        return
    asyncio.run(run(args, argv))


if __name__ == "__main__":
    main()
